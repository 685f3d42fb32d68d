"""elas-bench throughput on the CPU with a tiny model: files, columns, the time split, OOM handling."""
from __future__ import annotations

import csv
import importlib.util
import json
import math

import pytest
import torch

from elas_megatron.bench import throughput as tp
from elas_megatron.cli.bench import main

HAVE_MPL = importlib.util.find_spec("matplotlib") is not None
TINY_SWEEP = ["--tiny", "--seq-lens", "16", "--steps", "1", "--warmup", "1"]


def _rows(out):
    return json.loads((out / "results.json").read_text())["rows"]


def test_cli_writes_results_report_and_plot(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["throughput", *TINY_SWEEP, "--variants", "dense,cola,elas", "--micro-batches", "1,2", "--inference",
                 "--isolation", "none", "--out", str(out)]) == 0
    rows = _rows(out)
    assert {(r["mode"], r["variant"], r["micro_batch"]) for r in rows} == {
        (m, v, b) for m in ("train", "inference") for v in ("dense", "cola", "elas") for b in (1, 2)}
    for r in rows:
        assert r["status"] == "ok" and r["tokens_per_s"] > 0 and r["device"] == "cpu"
        assert r["peak_gib"] is None and r["mfu"] is None  # CPU: timings only
        assert r["time_attention_ms"] > r["time_core_attention_ms"] > 0 and r["time_ffn_ms"] > 0
        assert r["time_step_ms"] >= r["time_attention_ms"] + r["time_ffn_ms"]
        if r["mode"] == "train":
            assert r["time_attention_bwd_ms"] > 0 and r["time_optimizer_ms"] > 0
            assert r["activation_estimate_gib"] > 0
        else:
            assert "time_attention_bwd_ms" not in r and r["time_optimizer_ms"] == 0
    with (out / "results.csv").open() as f:
        header = next(csv.reader(f))
    for column in ("variant", "mode", "micro_batch", "seq_len", "status", "tokens_per_s", "mfu", "peak_gib",
                   "activation_gib", "time_attention_ms", "time_ffn_ms", "time_optimizer_ms", "time_grad_sync_ms"):
        assert column in header
    text = capsys.readouterr().out
    assert "elas/cola" in text and "elas/dense" in text and "prefill (forward only)" in text
    assert (out / "report.md").read_text() in text
    assert (out / "throughput.png").exists() == HAVE_MPL


def test_simulated_oom_stops_the_walk_and_is_confirmed_in_a_fresh_process(tmp_path):
    out = tmp_path / "bench"
    # variant isolation: b=1 fits, b=2 "runs out of memory" after b=1 in the same worker, is re-run alone (OOM
    # again), and b=4 is never tried
    assert main(["throughput", *TINY_SWEEP, "--variants", "elas", "--micro-batches", "1,2,4", "--profile-steps", "0",
                 "--isolation", "variant", "--simulate-oom-above", "1", "--out", str(out)]) == 0
    rows = _rows(out)
    assert [(r["micro_batch"], r["status"]) for r in rows] == [(1, "ok"), (2, "oom")]
    assert sorted(p.name for p in (out / "logs").iterdir()) == ["train_elas_s16_b1.log", "train_elas_s16_b2.log"]
    report = (out / "report.md").read_text()
    assert "| elas | 1 | 2 |" in report  # largest that fits, first OOM


def _spec(**kw):
    return tp.WorkerSpec(**{"configs": [], "overrides": [], "variant": "elas", "mode": "train", "seq_len": 16,
                            "micro_batches": [1, 2, 4], **kw})


def _rec(b, status="ok"):
    return {"label": "x", "variant": "elas", "mode": "train", "seq_len": 16, "micro_batch": b, "status": status}


def test_advance_config_isolation_stops_at_the_first_oom():
    rows = []
    assert tp._advance(_spec(), [_rec(1)], None, [1, 2, 4], "config", rows) == [2, 4]
    assert tp._advance(_spec(), [_rec(2, "oom")], None, [2, 4], "config", rows) == []
    assert [r["status"] for r in rows] == ["ok", "oom"]


def test_advance_variant_isolation_retries_a_late_oom_and_reports_a_dead_worker():
    rows = []
    assert tp._advance(_spec(), [_rec(1), _rec(2, "oom")], None, [1, 2, 4], "variant", rows) == [2, 4]
    assert [r["micro_batch"] for r in rows] == [1]  # the unconfirmed OOM is not recorded
    assert tp._advance(_spec(), [_rec(2)], "worker exit -9: CUDA out of memory", [2, 4], "variant", rows) == []
    assert [(r["micro_batch"], r["status"]) for r in rows] == [(1, "ok"), (2, "ok"), (4, "oom")]
    rows = []
    assert tp._advance(_spec(), [], "worker exit 1: ImportError", [1, 2], "variant", rows) == []
    assert rows[0]["status"] == "error" and "ImportError" in rows[0]["error"]


def test_is_oom():
    assert tp.is_oom(torch.OutOfMemoryError("x")) and tp.is_oom(MemoryError())
    assert tp.is_oom(RuntimeError("CUDA error: out of memory")) and tp.is_oom(RuntimeError("CUBLAS_STATUS_ALLOC_FAILED"))
    assert not tp.is_oom(RuntimeError("shape mismatch"))


def test_prefill_flops_is_the_forward_third_without_all_but_the_last_logits():
    from elas_megatron.models.flops import flops_per_token, paper_model_config

    m = paper_model_config("1B", "elas")
    s, v = 1024, 32000
    expected = flops_per_token(m, v, s) / 3 - 2 * v * m.hidden_size * (1 - 1 / s)
    assert math.isclose(tp.prefill_flops_per_token(m, v, s), expected)
    assert tp.prefill_flops_per_token(m, v, 1) == pytest.approx(flops_per_token(m, v, 1) / 3)
