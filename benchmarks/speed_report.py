# SPDX-License-Identifier: Apache-2.0
"""Render the speed tables of docs/performance.md from one `benchmarks/run_speed.sh` result folder.

    python3 benchmarks/speed_report.py RES_DIR [--write docs/performance.md] [--title "one H200"]

RES_DIR holds the phases' `elas-bench throughput` folders (`throughput_1b/results.json`, ...), `device.txt` and
`commit.txt`. Prints the markdown; with `--write` it replaces the part of the file between the markers
`<!-- speed:begin -->` and `<!-- speed:end -->`, so the page is regenerated, not edited by hand. Phases that did
not run are left out of the tables.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

BEGIN, END = "<!-- speed:begin -->", "<!-- speed:end -->"
VARIANTS = ("dense", "cola", "elas")


def _all_rows(res: Path, name: str) -> list[dict]:
    """Every row of a phase's results.json, failed ones (OOM) included; none for a phase that did not run."""
    path = res / name / "results.json"
    return json.loads(path.read_text())["rows"] if path.exists() else []


def _rows(res: Path, name: str) -> list[dict]:
    return [r for r in _all_rows(res, name) if r.get("status") == "ok"]


def _best(rows: list[dict], variant: str, mode: str = "train") -> dict | None:
    ok = [r for r in rows if r["variant"] == variant and r["mode"] == mode]
    return max(ok, key=lambda r: r["tokens_per_s"]) if ok else None


def _at(rows: list[dict], variant: str, micro_batch: int, mode: str = "train") -> dict | None:
    return next((r for r in rows if r["variant"] == variant and r["mode"] == mode
                 and r["micro_batch"] == micro_batch), None)


def _largest(rows_all: list[dict], variant: str) -> str:
    """The largest micro-batch that fit, '>= N' when nothing larger ran out of memory."""
    mine = [r for r in rows_all if r["variant"] == variant and r["mode"] == "train"]
    fit = [r["micro_batch"] for r in mine if r["status"] == "ok"]
    if not fit:
        return "-"
    oom = [r["micro_batch"] for r in mine if r["status"] == "oom"]
    return str(max(fit)) if oom else f">= {max(fit)}"


def _fmt_row(r: dict | None, label: str) -> str:
    if r is None:
        return f"| {label} | not measured in this run | | | |"
    mfu = f"{100 * r['mfu']:.1f} %" if r.get("mfu") is not None else "-"
    peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "-"
    return f"| {label} | {r['micro_batch']} | {r['tokens_per_s']:,.0f} | {mfu} | {peak} |"


def training_table(res: Path) -> list[str]:
    after, plain = _rows(res, "throughput_1b"), _rows(res, "throughput_1b_plain")
    if not after:
        return []
    out = ["### 1B training: best micro-batch per variant", "",
           "| variant | micro-batch | tokens/s | MFU | peak GiB |", "|---|---:|---:|---:|---:|"]
    for v in VARIANTS:
        out.append(_fmt_row(_best(after, v), f"{v}"))
    for v in VARIANTS:
        if plain:
            out.append(_fmt_row(_best(plain, v), f"{v}, plain paths"))
    best = {v: _best(after, v) for v in VARIANTS}
    if all(best.values()):
        e, c, d = (best[v]["tokens_per_s"] for v in ("elas", "cola", "dense"))
        out += ["", f"elas / dense {e / d:.2f}x, elas / cola {e / c:.2f}x at each one's best micro-batch. "
                    f"Largest micro-batch that fits: " + ", ".join(
                        f"{v} {_largest(_all_rows(res, 'throughput_1b'), v)}" for v in VARIANTS) + "."]
    if plain:
        gains = []
        for v in VARIANTS:
            a, p = _best(after, v), _best(plain, v)
            if a and p:
                gains.append(f"{v} {a['tokens_per_s'] / p['tokens_per_s']:.2f}x")
        out += ["", "Speed switches on vs plain paths (each at its best micro-batch): " + ", ".join(gains) + "."]
    return out


def switches_table(res: Path) -> list[str]:
    steps = [("plain paths", "throughput_1b_plain"), ("+ foreach multi-tensor ops", "throughput_1b_foreach"),
             ("+ separate low-rank parts", "throughput_1b_parts"), ("+ fused output layer + loss (= defaults)",
                                                                    "throughput_1b")]
    have = {name: _rows(res, name) for _, name in steps}
    if not have["throughput_1b_foreach"]:
        return []
    mb = have["throughput_1b_foreach"][0]["micro_batch"]
    out = [f"### 1B training, one switch at a time (micro-batch {mb})", "",
           "| switches | " + " | ".join(f"{v} tokens/s | {v} MFU" for v in ("cola", "elas")) + " |",
           "|---|" + "---:|" * 4]
    for label, name in steps:
        cells = []
        for v in ("cola", "elas"):
            r = _at(have[name], v, mb)
            cells += ([f"{r['tokens_per_s']:,.0f}", f"{100 * r['mfu']:.1f} %"] if r and r.get("mfu") is not None
                      else ["-", "-"])
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return out


def split_table(res: Path) -> list[str]:
    after, plain = _rows(res, "throughput_1b"), _rows(res, "throughput_1b_plain")
    keys = [("attention", "time_attention_ms"), ("of which core attention", "time_core_attention_ms"),
            ("FFN", "time_ffn_ms"), ("output layer (+ loss when fused)", "time_output_layer_ms"),
            ("optimizer", "time_optimizer_ms"), ("other", "time_other_ms"), ("step", "time_step_ms")]
    cols = []
    for v in VARIANTS:
        for label, rows in (("", after), (" plain", plain)):
            r = _best(rows, v) if rows else None
            if r is not None and "time_step_ms" in r:
                mb = r["micro_batch"]
                if label:  # compare at the same micro-batch as the defaults' best when it ran
                    r = _at(rows, v, _best(after, v)["micro_batch"]) or r
                    mb = r["micro_batch"]
                cols.append((f"{v}{label} (mb {mb})", r))
    if not cols:
        return []
    out = ["### 1B time split (ms per step, one profiled step)", "",
           "| part | " + " | ".join(c for c, _ in cols) + " |", "|---|" + "---:|" * len(cols)]
    for label, key in keys:
        out.append(f"| {label} | " + " | ".join(f"{r.get(key, 0.0):.1f}" for _, r in cols) + " |")
    return out


def prefill_table(res: Path) -> list[str]:
    after, plain = _rows(res, "prefill_1b"), _rows(res, "prefill_1b_plain")
    if not after:
        return []
    out = ["### 1B prefill (forward only, logits of the last position)", "",
           "| variant | micro-batch | tokens/s | plain paths tokens/s |", "|---|---:|---:|---:|"]
    for v in VARIANTS:
        a = _best(after, v, "inference")
        p = _at(plain, v, a["micro_batch"], "inference") if a else None
        if a:
            out.append(f"| {v} | {a['micro_batch']} | {a['tokens_per_s']:,.0f} | "
                       f"{p['tokens_per_s']:,.0f} |" if p else f"| {v} | {a['micro_batch']} | "
                       f"{a['tokens_per_s']:,.0f} | - |")
    return out


def seven_b_table(res: Path) -> list[str]:
    rows = _rows(res, "throughput_7b")
    if not rows:
        return []
    out = ["### 7B training on one GPU", "", "| variant | micro-batch | tokens/s | MFU | peak GiB |",
           "|---|---:|---:|---:|---:|"]
    best = {}
    for v in ("cola", "elas"):
        best[v] = _best(rows, v)
        out.append(_fmt_row(best[v], v))
    if all(best.values()):
        out += ["", f"elas / cola {best['elas']['tokens_per_s'] / best['cola']['tokens_per_s']:.2f}x at each one's "
                    "best micro-batch."]
    return out


def render(res: Path, title: str) -> str:
    device = (res / "device.txt").read_text().strip().replace("\n", "; ") if (res / "device.txt").exists() else "?"
    commit = (res / "commit.txt").read_text().strip()[:12] if (res / "commit.txt").exists() else "?"
    parts = [f"Measured on {title} ({device}), commit `{commit}`, bf16, sequence 1024, random tokens, all variants "
             "side by side in each run (`bash benchmarks/run_speed.sh`, then `python3 benchmarks/speed_report.py "
             "RES --write docs/performance.md`). *Plain paths* = `optim.multi_tensor_impl=megatron "
             "model.lowrank_parts=fused model.loss_backend=megatron`, the code paths before these switches existed."]
    for table in (training_table(res), switches_table(res), split_table(res), prefill_table(res), seven_b_table(res)):
        if table:
            parts.append("\n".join(table))
    return "\n\n".join(parts) + "\n"


def write(doc: Path, text: str) -> None:
    page = doc.read_text()
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if not pattern.search(page):
        raise SystemExit(f"{doc}: no {BEGIN} ... {END} markers; add them where the tables belong")
    doc.write_text(pattern.sub(lambda _: f"{BEGIN}\n{text}{END}", page))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("res", type=Path)
    parser.add_argument("--write", type=Path, default=None)
    parser.add_argument("--title", default="one H200")
    args = parser.parse_args()
    text = render(args.res, args.title)
    print(text)
    if args.write:
        write(args.write, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
