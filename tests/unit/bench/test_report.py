"""Tables and summaries of elas-bench results, from hand-written rows."""
from __future__ import annotations

from elas_megatron.bench import report


def _row(variant, b, tps=None, status="ok", mode="train", **kw):
    r = {"label": "1b", "mode": mode, "seq_len": 1024, "variant": variant, "micro_batch": b, "status": status}
    if status == "ok":
        r.update(tokens_per_s=tps, mfu=0.4, peak_gib=10.0 + b, activation_gib=float(b), time_step_ms=100.0,
                 time_attention_ms=30.0, time_core_attention_ms=10.0, time_ffn_ms=40.0, time_optimizer_ms=5.0)
    r.update(kw)
    return r


ROWS = [_row("dense", 8, 1000.0), _row("dense", 16, 1100.0), _row("dense", 32, status="oom"),
        _row("cola", 8, 1500.0), _row("cola", 16, 1600.0), _row("cola", 32, status="oom"),
        _row("elas", 8, 2000.0), _row("elas", 16, 2200.0), _row("elas", 32, 2400.0)]


def test_summary_largest_batch_that_fits():
    s = report.summarize(ROWS)[("1b", "train", 1024)]
    assert (s["dense"]["max_batch"], s["dense"]["first_oom"], s["dense"]["max_batch_is_limit"]) == (16, 32, True)
    assert (s["elas"]["max_batch"], s["elas"]["first_oom"], s["elas"]["max_batch_is_limit"]) == (32, None, False)
    assert s["elas"]["best"]["tokens_per_s"] == 2400.0


def test_markdown_has_ratios_oom_cells_and_the_split():
    text = report.markdown_report(ROWS, {"device": "H100", "dtype": "bf16"})
    assert "| 16 | 1,100 | 1,600 | 2,200 | 1.38x | 2.00x |" in text        # per batch: elas/cola, elas/dense
    assert "| 32 | OOM | OOM | 2,400 |" in text
    assert "| elas | >= 32 (no OOM) | - | 2,400 |" in text
    assert "| **elas/cola** | 2.00x (a lower bound did not OOM) | | 1.50x |" in text  # 2400 / 1600
    assert "| dense | 16 | 100.0 | 30.0 (30%) | 10.0 (10%) | 40.0 (40%) |" in text


def test_write_and_read_results(tmp_path):
    report.write_results(ROWS, tmp_path, {"label": "1b"})
    meta, rows = report.read_results(tmp_path)
    assert meta == {"label": "1b"} and rows == ROWS
    header = (tmp_path / "results.csv").read_text().splitlines()[0].split(",")
    assert header[:len(report.LEADING_COLUMNS)] == list(report.LEADING_COLUMNS)
