# SPDX-License-Identifier: Apache-2.0
"""Validation perplexity vs tokens of several training runs in one PNG (e.g. runs of different
``elas-bench quality`` calls, which each plot only their own runs).

Each run is given as ``RUN=LABEL``, where ``RUN`` is either a run directory holding ``metrics.jsonl`` and
``config.yaml`` (as written by ``elas-train`` and kept by ``elas-bench quality`` under ``OUT/runs/<name>/``; tokens
are ``step x train.global_batch x train.seq_len`` from its ``config.yaml``) or ``QUALITY_JSON:NAME``, the run
``NAME`` of a ``quality.json`` that ``elas-bench quality`` wrote (its curve; this is what benchmarks/results keeps).
With ``--ref LABEL`` a second panel shows
every other run's validation perplexity relative to that run's, in %, at the steps both evaluated;
``--ref-of LABEL=REF`` compares one run against another reference (e.g. a second seed against its own cola).

    python benchmarks/plot_quality_runs.py --out quality_60m_all.png --ref cola \\
        R/quality_60m/runs/60m_cola=cola R/quality_60m/runs/60m_elas_warmup0=elas \\
        R/seed2/quality.json:60m_cola="cola, seed 2" R/seed2/quality.json:60m_elas_warmup0="elas, seed 2" \\
        --ref-of "elas, seed 2=cola, seed 2"

Needs matplotlib (``pip install 'elas-megatron[plot]'``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from elas_megatron.training.metrics import read_metrics


def val_curve(run: str | Path) -> list[tuple[int, int, float]]:
    """``(step, tokens, val_ppl)`` of every evaluation of ``run``: a run directory or ``QUALITY_JSON:NAME``."""
    path, sep, name = str(run).rpartition(":")
    if sep and path.endswith(".json"):
        runs = {r["name"]: r for r in json.loads(Path(path).read_text())}
        if name not in runs:
            raise ValueError(f"{path} has no run {name!r}; it has {sorted(runs)}")
        return [(p["step"], p["tokens"], p["val_ppl"]) for p in runs[name]["curve"]]
    run_dir = Path(run)
    train = yaml.safe_load((run_dir / "config.yaml").read_text())["train"]
    tokens_per_step = int(train["global_batch"]) * int(train["seq_len"])
    return [(r["step"], r["step"] * tokens_per_step, r["val_ppl"])
            for r in read_metrics(run_dir / "metrics.jsonl") if "val_ppl" in r]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", metavar="RUN=LABEL",
                   help="a run directory or QUALITY_JSON:NAME, and its label in the legend")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--ref", help="label of the run the second panel compares against (no second panel without it)")
    p.add_argument("--ref-of", action="append", default=[], metavar="LABEL=REF",
                   help="compare run LABEL against run REF instead of --ref (repeatable)")
    p.add_argument("--title", default="validation perplexity vs tokens")
    args = p.parse_args(argv)

    curves: dict[str, list[tuple[int, int, float]]] = {}
    for spec in args.runs:
        run, sep, label = spec.partition("=")
        if not sep or not label:
            p.error(f"expected RUN=LABEL, got {spec!r}")
        try:
            curves[label] = val_curve(run)
        except (OSError, ValueError) as exc:
            p.error(f"{run}: {exc}")
        if not curves[label]:
            p.error(f"{run}: no validation perplexity in it")
    ref_of: dict[str, str] = {}
    for spec in args.ref_of:
        label, sep, ref = spec.rpartition("=")
        if not sep or label not in curves or ref not in curves:
            p.error(f"--ref-of {spec!r}: expected LABEL=REF with both among the labels {list(curves)}")
        ref_of[label] = ref
    if args.ref is not None and args.ref not in curves:
        p.error(f"--ref {args.ref!r} is not one of the labels {list(curves)}")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if args.ref else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.5), squeeze=False)
    ax = axes[0][0]
    for label, curve in curves.items():
        ax.plot([t / 1e6 for _, t, _ in curve], [v for _, _, v in curve], marker=".", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("tokens (M)")
    ax.set_ylabel("validation perplexity")
    ax.set_title(args.title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if args.ref:
        ax = axes[0][1]
        refs = set(ref_of.values()) | {args.ref}
        for (label, curve), color in zip(curves.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"] * 9):
            ref_label = ref_of.get(label, args.ref)
            if label in refs and label not in ref_of:
                continue
            ref = {step: v for step, _, v in curves[ref_label]}
            both = [(t, v / ref[step]) for step, t, v in curve if step in ref]
            ax.plot([t / 1e6 for t, _ in both], [100 * (r - 1) for _, r in both], marker=".", color=color,
                    label=f"{label} vs {ref_label}")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xlabel("tokens (M)")
        ax.set_ylabel("validation perplexity vs reference run (%)")
        ax.set_title("relative to a reference run")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
