# SPDX-License-Identifier: Apache-2.0
"""Results files, Markdown tables and PNG plots of ``elas-bench``.

Throughput: ``results.json`` (``{"meta": ..., "rows": [...]}``, one row per configuration), ``results.csv``
(the same rows; the leading columns below, then every other key), ``report.md`` and ``throughput.png``
(tokens/s and peak memory against the micro-batch size, one line per variant; one row of panels per mode and
sequence length). Quality: ``quality.json``, ``quality.md``, ``quality.png`` (validation perplexity against
training tokens, one line per run). Plots need matplotlib (``pip install 'elas-megatron[plot]'``); without it
the PNG is skipped with a warning and ``elas-bench plot DIR`` draws it later from the JSON.
"""
from __future__ import annotations

import csv
import json
import logging
import os
from collections import defaultdict
from pathlib import Path

__all__ = ["LEADING_COLUMNS", "markdown_report", "plot_quality", "plot_throughput", "read_results", "summarize",
           "write_results"]

logger = logging.getLogger(__name__)

LEADING_COLUMNS = ("label", "mode", "seq_len", "variant", "micro_batch", "status", "tokens_per_step",
                   "tokens_per_s", "mfu", "tflops_per_s", "step_time_s", "peak_gib", "activation_gib",
                   "state_gib", "activation_estimate_gib", "time_step_ms", "time_attention_ms",
                   "time_core_attention_ms", "time_ffn_ms", "time_output_layer_ms", "time_optimizer_ms",
                   "time_grad_sync_ms", "time_other_ms")
VARIANT_ORDER = ("dense", "cola", "elas")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_results(rows: list[dict], out_dir: Path, meta: dict) -> None:
    """``results.json`` and ``results.csv`` of all rows (rewritten whole: safe to call after every worker)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(out_dir / "results.json", json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    keys = list(LEADING_COLUMNS) + sorted({k for r in rows for k in r} - set(LEADING_COLUMNS))
    tmp = out_dir / "results.csv.tmp"
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k, "")) for k in keys})
    os.replace(tmp, out_dir / "results.csv")


def read_results(path: Path) -> tuple[dict, list[dict]]:
    """``(meta, rows)`` of a ``results.json`` (or of the one inside a directory)."""
    path = Path(path)
    data = json.loads((path / "results.json" if path.is_dir() else path).read_text())
    return data.get("meta", {}), data["rows"]


def _groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r.get("label", ""), r["mode"], r["seq_len"])].append(r)
    return dict(groups)


def _variants(rows: list[dict]) -> list[str]:
    present = {r["variant"] for r in rows}
    return [v for v in VARIANT_ORDER if v in present] + sorted(present - set(VARIANT_ORDER))


def summarize(rows: list[dict]) -> dict[tuple, dict[str, dict]]:
    """Per (label, mode, seq_len) and variant: the largest micro-batch that fits and the numbers there.

    ``max_batch``: largest micro-batch with status ok; ``max_batch_is_limit``: whether a larger one was tried
    and ran out of memory (otherwise the largest that fits is only known to be at least ``max_batch``);
    ``first_oom``; ``at_max``: the row of ``max_batch``; ``best``: the row with the most tokens/s.
    """
    out: dict[tuple, dict[str, dict]] = {}
    for key, group in _groups(rows).items():
        per_variant = {}
        for v in _variants(group):
            mine = [r for r in group if r["variant"] == v]
            ok = sorted((r for r in mine if r["status"] == "ok"), key=lambda r: r["micro_batch"])
            ooms = sorted(r["micro_batch"] for r in mine if r["status"] == "oom")
            errors = [r for r in mine if r["status"] == "error"]
            per_variant[v] = {
                "max_batch": ok[-1]["micro_batch"] if ok else None,
                "max_batch_is_limit": bool(ooms and ok and ooms[0] > ok[-1]["micro_batch"]),
                "first_oom": ooms[0] if ooms else None,
                "at_max": ok[-1] if ok else None,
                "best": max(ok, key=lambda r: r["tokens_per_s"]) if ok else None,
                "errors": [f"b={r['micro_batch']}: {r.get('error', '')[:200]}" for r in errors],
            }
        out[key] = per_variant
    return out


def _fmt(value, spec: str, empty: str = "") -> str:
    return empty if value is None else format(value, spec)


def _ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a and b else ""


def _cell(r: dict | None, key: str) -> str:
    if r is None:
        return ""
    if r["status"] != "ok":
        return r["status"].upper()
    value = r.get(key)
    if value is None:
        return "n/a"
    if key == "mfu":
        return f"{100 * value:.1f}%"
    if key == "tokens_per_s":
        return f"{value:,.0f}"
    return f"{value:.2f}"


def _batch_table(group: list[dict], variants: list[str]) -> list[str]:
    by = {(r["variant"], r["micro_batch"]): r for r in group}
    batches = sorted({r["micro_batch"] for r in group})
    ratios = [(a, b) for a, b in (("elas", "cola"), ("elas", "dense")) if a in variants and b in variants]
    head = (["micro-batch"] + [f"{v} tok/s" for v in variants] + [f"{a}/{b}" for a, b in ratios]
            + [f"{v} MFU" for v in variants] + [f"{v} peak GiB" for v in variants]
            + [f"{v} act. GiB" for v in variants])
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for b in batches:
        cells = [str(b)] + [_cell(by.get((v, b)), "tokens_per_s") for v in variants]
        for a, c in ratios:
            ra, rc = by.get((a, b)), by.get((c, b))
            ok = ra and rc and ra["status"] == rc["status"] == "ok"
            cells.append(_ratio(ra["tokens_per_s"], rc["tokens_per_s"]) if ok else "")
        cells += [_cell(by.get((v, b)), "mfu") for v in variants]
        cells += [_cell(by.get((v, b)), "peak_gib") for v in variants]
        cells += [_cell(by.get((v, b)), "activation_gib") for v in variants]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _summary_table(summary: dict[str, dict]) -> list[str]:
    lines = [("| variant | largest micro-batch that fits | first OOM | tok/s there | MFU there | peak GiB there | "
              "best tok/s (at micro-batch) |"), "|---|---:|---:|---:|---:|---:|---:|"]
    for v, s in summary.items():
        at, best = s["at_max"], s["best"]
        mb = "none" if s["max_batch"] is None else (f"{s['max_batch']}" if s["max_batch_is_limit"]
                                                     else f">= {s['max_batch']} (no OOM)")
        best_at = f" ({best['micro_batch']})" if best else ""
        lines.append(f"| {v} | {mb} | {_fmt(s['first_oom'], 'd', '-')} | {_cell(at, 'tokens_per_s')} | "
                     f"{_cell(at, 'mfu')} | {_cell(at, 'peak_gib')} | {_cell(best, 'tokens_per_s')}{best_at} |")
    for a, b in (("elas", "cola"), ("elas", "dense")):
        if a in summary and b in summary and summary[a]["at_max"] and summary[b]["at_max"]:
            sa, sb = summary[a], summary[b]
            bound = "" if sa["max_batch_is_limit"] and sb["max_batch_is_limit"] else " (a lower bound did not OOM)"
            lines.append(f"| **{a}/{b}** | {_ratio(sa['max_batch'], sb['max_batch'])}{bound} | | "
                         f"{_ratio(sa['at_max']['tokens_per_s'], sb['at_max']['tokens_per_s'])} | | | "
                         f"{_ratio(sa['best']['tokens_per_s'], sb['best']['tokens_per_s'])} |")
    return lines


def _split_table(summary: dict[str, dict]) -> list[str]:
    parts = ("attention", "core_attention", "ffn", "output_layer", "optimizer", "grad_sync", "other")
    lines = ["| variant | micro-batch | step ms | " + " | ".join(p.replace("_", " ") + " ms (%)" for p in parts) + " |",
             "|---|---:|---:|" + "---:|" * len(parts)]
    for v, s in summary.items():
        r = s["at_max"]
        if not r or r.get("time_step_ms") is None:
            continue
        step = r["time_step_ms"]
        cells = [f"{r.get(f'time_{p}_ms', 0.0):.1f} ({100 * r.get(f'time_{p}_ms', 0.0) / step:.0f}%)" for p in parts]
        lines.append(f"| {v} | {r['micro_batch']} | {step:.1f} | " + " | ".join(cells) + " |")
    return lines


def markdown_report(rows: list[dict], meta: dict | None = None) -> str:
    """Tables per (label, mode, sequence length): every micro-batch, the largest that fits, the time split."""
    meta = meta or {}
    out = []
    if meta:
        out.append("Device: {device}; {dtype}; steps: {warmup_steps} warm-up + {steps} timed (median) + "
                   "{profile_steps} profiled; isolation: {isolation}.".format(**{
                       k: meta.get(k, "?") for k in ("device", "dtype", "warmup_steps", "steps", "profile_steps",
                                                     "isolation")}))
    summaries = summarize(rows)
    for key, group in _groups(rows).items():
        label, mode, seq_len = key
        variants = _variants(group)
        what = "training step (fwd + bwd + optimizer)" if mode == "train" else "prefill (forward only)"
        out += ["", f"### {label or 'model'}: {what}, sequence length {seq_len}", ""]
        out += _batch_table(group, variants)
        out += ["", "Largest micro-batch that fits, and the ratios:", ""]
        out += _summary_table(summaries[key])
        split = _split_table(summaries[key])
        if len(split) > 2:
            out += ["", ("Time per step at the largest micro-batch that fits (profiled step, module timers; "
                         "core attention is part of attention):"), ""]
            out += split
        errors = [f"{v}: {e}" for v, s in summaries[key].items() for e in s["errors"]]
        if errors:
            out += ["", "Errors: " + "; ".join(errors)]
    return "\n".join(out) + "\n"


def _pyplot(path: Path, then: str):
    """matplotlib's pyplot (Agg), or None with a warning that ``path`` is not drawn and what to run after
    installing it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: %s not drawn (pip install matplotlib; then %s)", path, then)
        return None
    return plt


def plot_throughput(rows: list[dict], path: Path) -> bool:
    """tokens/s and peak memory vs micro-batch, one line per variant; False (and a warning) without matplotlib."""
    plt = _pyplot(path, f"elas-bench plot {path.parent}")
    if plt is None:
        return False
    groups = _groups(rows)
    fig, axes = plt.subplots(len(groups), 2, figsize=(11, 3.6 * len(groups)), squeeze=False)
    colors = {"dense": "tab:blue", "cola": "tab:orange", "elas": "tab:green"}
    for (label, mode, seq_len), ax_row in zip(groups, axes, strict=True):
        group = groups[(label, mode, seq_len)]
        for v in _variants(group):
            ok = sorted((r for r in group if r["variant"] == v and r["status"] == "ok"), key=lambda r: r["micro_batch"])
            oom = [r["micro_batch"] for r in group if r["variant"] == v and r["status"] == "oom"]
            style = {"color": colors.get(v), "marker": "o", "label": v}
            if ok:
                ax_row[0].plot([r["micro_batch"] for r in ok], [r["tokens_per_s"] for r in ok], **style)
                mem = [(r["micro_batch"], r["peak_gib"]) for r in ok if r.get("peak_gib") is not None]
                if mem:
                    ax_row[1].plot(*zip(*mem, strict=True), **style)
            for b in oom[:1]:
                for ax in ax_row:
                    ax.axvline(b, color=colors.get(v), linestyle=":", linewidth=1)
        what = "training" if mode == "train" else "prefill"
        ax_row[0].set_title(f"{label} {what}, seq {seq_len}: tokens/s (dotted: first OOM)")
        ax_row[1].set_title(f"{label} {what}, seq {seq_len}: peak memory (GiB)")
        batches = sorted({r["micro_batch"] for r in group})
        for ax in ax_row:
            ax.set_xscale("log", base=2)
            ax.set_xticks(batches, [str(b) for b in batches])
            ax.set_xlabel("micro-batch (sequences)")
            ax.grid(True, alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend()
        if not any(r.get("peak_gib") is not None for r in group):
            ax_row[1].text(0.5, 0.5, "no device memory on CPU", ha="center", transform=ax_row[1].transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_quality(runs: list[dict], path: Path) -> bool:
    """Validation perplexity vs training tokens, one line per run; False (and a warning) without matplotlib."""
    plt = _pyplot(path, "elas-bench quality --report-only")
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for run in runs:
        curve = run.get("curve") or []
        if curve:
            ax.plot([c["tokens"] / 1e6 for c in curve], [c["val_ppl"] for c in curve], marker=".", label=run["name"])
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("validation perplexity")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title("validation perplexity (same data, seed and tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
