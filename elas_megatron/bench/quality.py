# SPDX-License-Identifier: Apache-2.0
"""Quality runs: dense, cola and elas trained on the same data, seed and token budget; perplexity curves.

Each run is ``python -m elas_megatron.cli.train`` in its own process (sequentially), composed exactly as a real
run: ``configs/c4.yaml`` (the paper's optimizer recipe and batch), ``configs/model/<size>.yaml``,
``configs/variant/<variant>.yaml``, then the data and budget overrides, identical for every run except the
variant and, for elas, ``model.dense_warmup_steps``. Each run writes ``<out>/runs/<name>/metrics.jsonl``;
:func:`collect` reads the validation records (``val_loss``, ``val_ppl`` every ``train.eval_every`` steps and at
the end) and :func:`quality_table` compares final perplexities (elas vs cola in %, the paper's "minimal
degradation" claim). The learning rates are the recipe's: 3e-3 for the low-rank 60M/130M, 1e-3 for dense.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import subprocess
import sys
import time
from pathlib import Path

from elas_megatron.variants.registry import get_variant

__all__ = ["QualityRun", "collect", "plan_runs", "quality_table", "run_all"]

logger = logging.getLogger(__name__)

DEMO_PREFIX = "data/demo/tokens/demo_text_document"
TINY_OVERRIDES = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.ffn_hidden_size=128",
                  "model.rank=16", "train.device=cpu", "train.dtype=fp32", "train.seq_len=32",
                  "train.global_batch=4", "train.micro_batch=2", "train.eval_iters=2"]


@dataclasses.dataclass(kw_only=True)
class QualityRun:
    name: str
    size: str
    variant: str
    dense_warmup_steps: int
    configs: list[str]
    overrides: list[str]
    run_dir: str


def _tokenizer_of(prefix: str) -> str | None:
    """The tokenizer ``elas-prep`` recorded next to a dataset (``PREFIX.meta.json``), if any."""
    meta = Path(prefix + ".meta.json")
    return json.loads(meta.read_text()).get("tokenizer") if meta.is_file() else None


def data_overrides(data: str | None, valid: str | None, tokenizer: str | None) -> list[str]:
    """``data.*`` overrides for a train prefix (default: the shipped demo corpus) and optional valid prefix."""
    prefix = data or DEMO_PREFIX
    tokenizer = tokenizer or _tokenizer_of(prefix)
    if tokenizer is None:
        raise ValueError(f"no tokenizer for {prefix}: pass --tokenizer (no {prefix}.meta.json names one)")
    out = [f"data.tokenizer={tokenizer}", f"data.train_prefixes=[{prefix}]", "data.train_weights=null"]
    if valid:
        out += [f"data.valid_prefixes=[{valid}]", "data.split=100,0,0"]
    else:  # 4 % of the documents: a steadier validation loss than the trainer's default 2 % on small corpora
        out += ["data.valid_prefixes=null", "data.split=96,4,0"]
    return out


def plan_runs(*, sizes: list[str], variants: list[str], elas_warmups: list[int], steps: int, out_dir: Path,
              common: list[str], config_dir: Path = Path("configs")) -> list[QualityRun]:
    """The runs: every size x variant, a variant with 2:4 sparsity (elas) once per dense warm-up length (same
    everything else)."""
    runs = []
    for size in sizes:
        for variant in variants:
            sparse = get_variant(variant).sparsity
            for warmup in (elas_warmups if sparse else [0]):
                name = f"{size}_{variant}" + (f"_warmup{warmup}" if sparse else "")
                run_dir = out_dir / "runs" / name
                overrides = [*common, f"train.steps={steps}", f"train.run_dir={run_dir}",
                             f"model.dense_warmup_steps={warmup}", "checkpoint.every=0", "checkpoint.save_final=false"]
                runs.append(QualityRun(name=name, size=size, variant=variant, dense_warmup_steps=warmup,
                                       configs=[str(config_dir / "c4.yaml"), str(config_dir / "model" / f"{size}.yaml"),
                                                str(config_dir / "variant" / f"{variant}.yaml")],
                                       overrides=overrides, run_dir=str(run_dir)))
    return runs


def run_all(runs: list[QualityRun], *, out_dir: Path, timeout_s: float | None, jobs: int = 1) -> dict[str, str]:
    """Train every run in its own process, ``jobs`` at a time. Returns run name -> "ok" or why it failed.

    Several small runs share one GPU well (a 60M model leaves it idle between kernel launches); each run's
    numbers do not depend on ``jobs``, since every run draws from its own seed and data order.
    """
    status: dict[str, str] = {}
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    pending, active = list(runs), []
    try:
        while pending or active:
            while pending and len(active) < max(1, jobs):
                run = pending.pop(0)
                metrics = Path(run.run_dir) / "metrics.jsonl"
                if metrics.exists():  # a fresh curve, not one appended to an old run's
                    metrics.unlink()
                cmd = [sys.executable, "-m", "elas_megatron.cli.train", *run.configs, *run.overrides]
                logger.info("quality run %s: %s", run.name, " ".join(cmd[3:]))
                log = (out_dir / "logs" / f"{run.name}.log").open("w")
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
                active.append((run, proc, log, time.perf_counter()))
            time.sleep(0.2)
            for item in list(active):
                run, proc, log, start = item
                elapsed = time.perf_counter() - start
                if proc.poll() is None and (timeout_s is None or elapsed < timeout_s):
                    continue
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                    status[run.name] = f"timed out after {timeout_s:.0f} s"
                else:
                    status[run.name] = "ok" if proc.returncode == 0 else f"exit {proc.returncode}, see {log.name}"
                log.close()
                active.remove(item)
                logger.info("quality run %s: %s (%.0f s)", run.name, status[run.name], elapsed)
    finally:  # a time limit on the whole benchmark (SIGTERM -> exception) ends the runs still going
        for run, proc, log, _ in active:
            proc.kill()
            proc.wait()
            log.close()
            status.setdefault(run.name, "stopped")
    return status


def collect(runs: list[QualityRun]) -> list[dict]:
    """Each run's validation curve and final numbers from its ``metrics.jsonl`` (runs without one are kept
    with an empty curve)."""
    from elas_megatron.config.loader import load_config

    out = []
    for run in runs:
        cfg = load_config(run.configs, [o for o in run.overrides if not o.startswith("data.")])
        tokens_per_step = cfg.train.global_batch * cfg.train.seq_len
        path = Path(run.run_dir) / "metrics.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
        curve = [{"step": r["step"], "tokens": r["step"] * tokens_per_step, "val_loss": r["val_loss"],
                  "val_ppl": r["val_ppl"]} for r in records if "val_loss" in r]
        speeds = sorted(r["tokens_per_s"] for r in records if "tokens_per_s" in r)
        final = curve[-1] if curve else None
        out.append({**dataclasses.asdict(run), "curve": curve, "tokens_per_step": tokens_per_step,
                    "final_step": final["step"] if final else None, "final_tokens": final["tokens"] if final else None,
                    "final_val_loss": final["val_loss"] if final else None,
                    "final_val_ppl": final["val_ppl"] if final else None,
                    "median_tokens_per_s": speeds[len(speeds) // 2] if speeds else None})
    return out


def quality_table(results: list[dict]) -> str:
    """Markdown: final validation loss/perplexity per run, and each run's perplexity vs cola of its size in %."""
    cola = {r["size"]: r["final_val_ppl"] for r in results if r["variant"] == "cola" and r["final_val_ppl"]}
    lines = [("| run | variant | dense warm-up steps | steps | tokens (M) | final val loss | final val ppl | "
              "vs cola | median tok/s |"), "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        ppl, ref = r["final_val_ppl"], cola.get(r["size"])
        versus = f"{100 * (ppl / ref - 1):+.1f}%" if ppl and ref and r["variant"] != "cola" else ""
        loss = "not run" if r["final_val_loss"] is None else f"{r['final_val_loss']:.4f}"
        speed = r["median_tokens_per_s"]
        lines.append(
            f"| {r['name']} | {r['variant']} | {r['dense_warmup_steps'] if r['variant'] == 'elas' else '-'} | "
            f"{r['final_step'] or ''} | {(r['final_tokens'] or 0) / 1e6:.2f} | {loss} | "
            f"{'' if ppl is None else f'{ppl:.2f}'} | {versus} | {'' if speed is None else f'{speed:,.0f}'} |")
    return "\n".join(lines) + "\n"


def final_ppl_gap(results: list[dict], size: str) -> float | None:
    """Best elas final perplexity over cola's, minus 1 (e.g. 0.02 = 2 % worse), or None if either is missing."""
    cola = [r["final_val_ppl"] for r in results if r["size"] == size and r["variant"] == "cola" and r["final_val_ppl"]]
    elas = [r["final_val_ppl"] for r in results if r["size"] == size and r["variant"] == "elas" and r["final_val_ppl"]]
    if not cola or not elas or not all(math.isfinite(x) for x in cola + elas):
        return None
    return min(elas) / cola[0] - 1
