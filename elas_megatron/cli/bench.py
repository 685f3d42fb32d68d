# SPDX-License-Identifier: Apache-2.0
"""``elas-bench``: model-level throughput and quality benchmarks of dense, cola and elas (docs/performance.md).

* ``elas-bench throughput CONFIG.yaml... [section.key=value ...] [--variants dense,cola,elas]
  [--micro-batches 8,16,32] [--seq-lens 1024] [--steps N --warmup N] [--inference] [--out DIR]``: training
  steps (and with ``--inference`` forward-only prefill) per variant x micro-batch x sequence length, one
  subprocess per configuration; results.json/csv, report.md (printed) and throughput.png in ``--out``.
* ``elas-bench quality --sizes 60m [--steps N] [--variants ...] [--elas-warmup 0,N] [--data PREFIX]``: the
  variants trained on the same data, seed and tokens; quality.json/md and quality.png (validation perplexity).
* ``elas-bench ffn [--sizes 60m,350m,1b,7b] [--tokens 8192,32768,131072] [--backend auto] [--compare ...]
  [--pieces all]``: the FFN alone (full-rank SwiGLU, cola, elas computed dense, elas, and more elas forms with
  ``--compare``), fwd / bwd / fwd+bwd time, saved bytes, peak memory, elas's speed-up next to its 2:4 ceiling and
  its agreement with the reference (:mod:`elas_megatron.bench.ffn`); with ``--pieces`` also the elas core's
  kernels and GEMMs alone (:mod:`elas_megatron.bench.ffn_pieces`); ffn.json/md.
* ``elas-bench plot DIR``: report.md and throughput.png again from ``DIR/results.json`` (e.g. after a GPU run
  on a machine without matplotlib).
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path

logger = logging.getLogger("elas_megatron.bench")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="elas-bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("throughput", help="tokens/s, MFU, memory and time split per variant and micro-batch")
    t.add_argument("args", nargs="*", metavar="CONFIG.yaml | section.key=value")
    t.add_argument("--variants", type=_names, default=["dense", "cola", "elas"])
    t.add_argument("--micro-batches", type=_ints, default=[8, 16, 32, 64])
    t.add_argument("--inference-micro-batches", type=_ints, default=None,
                   help="micro-batches of the prefill sweep (default: --micro-batches)")
    t.add_argument("--seq-lens", type=_ints, default=[1024])
    t.add_argument("--steps", type=int, default=5, help="timed steps per configuration (median reported)")
    t.add_argument("--warmup", type=int, default=2, help="untimed steps first (kernel autotuning, allocator)")
    t.add_argument("--profile-steps", type=int, default=1, help="extra steps with module timers (0: no split)")
    t.add_argument("--accumulation", type=int, default=1, help="micro-batches per optimizer step")
    t.add_argument("--inference", action="store_true", help="also measure forward-only prefill")
    t.add_argument("--no-train", action="store_true", help="skip the training steps (with --inference)")
    t.add_argument("--isolation", choices=("config", "variant", "none"), default="config",
                   help="a subprocess per configuration (default), per variant walk, or none (in this process)")
    t.add_argument("--timeout-s", type=float, default=900, help="per worker process")
    t.add_argument("--vocab-size", type=int, default=32000, help="when the configs leave model.vocab_size unset")
    t.add_argument("--exact-init", action="store_true", help="the training initialisation (slow at 1B)")
    t.add_argument("--tiny", action="store_true", help="a 2-layer fp32 model on the CPU (smoke test)")
    t.add_argument("--label", default=None, help="name of the model in tables (default: config file stems)")
    t.add_argument("--out", type=Path, default=Path("runs/bench/throughput"))
    t.add_argument("--simulate-oom-above", type=int, default=None, help=argparse.SUPPRESS)
    q = sub.add_parser("quality", help="validation perplexity of the variants on the same data and tokens")
    q.add_argument("--sizes", type=_names, default=["60m"], help="configs/model/<size>.yaml")
    q.add_argument("--variants", type=_names, default=["dense", "cola", "elas"])
    q.add_argument("--elas-warmup", type=_ints, default=[0], help="elas runs with these dense warm-up steps")
    q.add_argument("--steps", type=int, default=2000)
    q.add_argument("--data", default=None, help="train prefix (default: the demo corpus)")
    q.add_argument("--valid-data", default=None, help="validation prefix (default: 4%% of the documents of --data)")
    q.add_argument("--tokenizer", default=None, help="default: the one in PREFIX.meta.json")
    q.add_argument("--override", "-o", action="append", default=[], metavar="section.key=value",
                   help="for every run, e.g. -o train.global_batch=128 -o train.eval_every=100")
    q.add_argument("--timeout-s", type=float, default=None, help="per run")
    q.add_argument("--jobs", type=int, default=1, help="runs at a time (small models share one GPU well)")
    q.add_argument("--tiny", action="store_true", help="a 2-layer fp32 model on the CPU (smoke test)")
    q.add_argument("--report-only", action="store_true", help="no training: tables and plot of existing runs")
    q.add_argument("--out", type=Path, default=Path("runs/bench/quality"))
    f = sub.add_parser("ffn", help="the FFN variants alone: time, saved bytes, speed-up vs its 2:4 ceiling")
    f.add_argument("--sizes", type=_names, default=["60m", "350m", "1b", "7b"],
                   help="configs/model/<size>.yaml, or HIDDENxDFFxRANK (e.g. 2048x5632x512)")
    f.add_argument("--tokens", type=_ints, default=[8192, 32768, 131072])
    f.add_argument("--backend", default="auto", help="ELAS kernel backend (auto, reference, triton, cusparselt)")
    f.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="default: bfloat16 on CUDA, float32 on the CPU")
    f.add_argument("--reps", type=int, default=10, help="timed repetitions (median reported)")
    f.add_argument("--warmup", type=int, default=3)
    f.add_argument("--compare", type=_names, default=[], metavar="FORMS",
                   help="more elas rows, comma list of: reference, triton, cusparselt, auto (backends), outside "
                        "(B_up outside the op), dense-grad-h (grad_h on cuBLAS), torch-cslt (torch._cslt_sparse_mm "
                        "instead of the binding); triton, cusparselt, dense-grad-h and torch-cslt need CUDA")
    f.add_argument("--pieces", default=None, metavar="SECTIONS",
                   help="also the elas core's pieces alone: 'all' (ceilings,fused,core,gemms,sparse_bwd) or a comma "
                        "list of those and tiles, gemm_tiles (Triton kernels: CUDA, or TRITON_INTERPRET=1)")
    f.add_argument("--out", type=Path, default=Path("runs/bench/ffn"))
    p = sub.add_parser("plot", help="report.md and throughput.png from DIR/results.json")
    p.add_argument("dir", type=Path)
    return parser


def _throughput(args) -> int:
    from elas_megatron.bench import report
    from elas_megatron.bench.throughput import TINY_OVERRIDES, run_sweep

    configs = [a for a in args.args if "=" not in a]
    overrides = [a for a in args.args if "=" in a] + (TINY_OVERRIDES if args.tiny else [])
    label = args.label or ("tiny" if args.tiny else "+".join(Path(c).stem for c in configs) or "default")
    meta = {"label": label, "configs": configs, "overrides": overrides, "steps": args.steps,
            "warmup_steps": args.warmup, "profile_steps": args.profile_steps, "isolation": args.isolation,
            "command": " ".join(["elas-bench", *sys.argv[1:]])}
    args.out.mkdir(parents=True, exist_ok=True)

    def on_rows(rows: list[dict]) -> None:
        ok = next((r for r in rows if r.get("device")), {})
        meta.update(device=ok.get("device", "?"), dtype=ok.get("dtype", "?"))
        report.write_results(rows, args.out, meta)

    batches = {}
    if not args.no_train:
        batches["train"] = args.micro_batches
    if args.inference:
        batches["inference"] = args.inference_micro_batches or args.micro_batches
    rows: list[dict] = []
    try:
        run_sweep(rows=rows, configs=configs, overrides=overrides, variants=args.variants, batches_by_mode=batches,
                  seq_lens=args.seq_lens, isolation=args.isolation, timeout_s=args.timeout_s, out_dir=args.out,
                  on_rows=on_rows, accumulation=args.accumulation, steps=args.steps, warmup_steps=args.warmup,
                  profile_steps=args.profile_steps, vocab_size=args.vocab_size, fast_init=not args.exact_init,
                  label=label, simulate_oom_above=args.simulate_oom_above)
    finally:  # also after SIGTERM (a time limit): whatever was measured is reported
        on_rows(rows)
        _report(args.out, meta, rows)
    return 0 if rows and all(r["status"] in ("ok", "oom") for r in rows) else 1


def _report(out: Path, meta: dict, rows: list[dict]) -> None:
    from elas_megatron.bench import report

    text = report.markdown_report(rows, meta)
    (out / "report.md").write_text(text)
    report.plot_throughput(rows, out / "throughput.png")
    print(text, flush=True)


def _quality(args) -> int:
    from elas_megatron.bench import quality, report

    common = quality.data_overrides(args.data, args.valid_data, args.tokenizer) + args.override
    common += quality.TINY_OVERRIDES if args.tiny else []
    runs = quality.plan_runs(sizes=args.sizes, variants=args.variants, elas_warmups=args.elas_warmup,
                             steps=args.steps, out_dir=args.out, common=common)
    status = {} if args.report_only else quality.run_all(runs, out_dir=args.out, timeout_s=args.timeout_s,
                                                                 jobs=args.jobs)
    results = quality.collect(runs)
    for r in results:
        r["status"] = status.get(r["name"], "not run here")
    (args.out / "quality.json").write_text(json.dumps(results, indent=1) + "\n")
    table = quality.quality_table(results)
    (args.out / "quality.md").write_text(table)
    report.plot_quality(results, args.out / "quality.png")
    print(table, flush=True)
    return 0 if all(s == "ok" for s in status.values()) else 1


def _ffn(args) -> int:
    import torch

    from elas_megatron.bench import ffn

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    pieces = None
    try:
        for size in args.sizes:
            ffn.ffn_shape(size)                                      # bad names fail before any work
        ffn.check_compare(args.compare, device)
        if args.pieces is not None:
            from elas_megatron.bench import ffn_pieces

            pieces = ffn_pieces.parse_pieces(args.pieces)
    except ValueError as exc:
        raise SystemExit(f"elas-bench ffn: {exc}") from None
    def log(text: str) -> None:
        print(text, flush=True)

    rows = ffn.run_ffn_bench(args.sizes, args.tokens, device=device, dtype=dtype, backend=args.backend,
                             reps=args.reps, warmup=args.warmup, compare=tuple(args.compare), log=log)
    result: dict = {"rows": rows}
    text = ffn.format_rows(rows)
    if pieces:
        result["pieces"] = ffn_pieces.run_pieces(pieces, args.sizes, args.tokens, device=device, dtype=dtype,
                                                 reps=args.reps, warmup=args.warmup, log=log)
        text += "\n\n" + ffn_pieces.format_pieces(result["pieces"])
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"command": " ".join(["elas-bench", *sys.argv[1:]]), "device": str(device), "dtype": str(dtype),
            "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None, "torch": torch.__version__}
    (args.out / "ffn.json").write_text(json.dumps({"meta": meta, **result}, indent=1, default=str) + "\n")
    (args.out / "ffn.md").write_text(f"`{meta['command']}` on {meta['gpu'] or 'CPU'}, {dtype}\n\n{text}\n")
    return 0 if not any("error" in sec for sec in result.get("pieces", {}).values()) else 1


def main(argv: list[str] | None = None) -> int:
    from elas_megatron.utils.logging import init_logging

    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "throughput" and args.no_train and not args.inference:
        parser.error("--no-train leaves nothing to measure: add --inference")
    init_logging("info")
    # A time limit (`timeout`, SLURM) sends SIGTERM: unwind, so the finally-blocks write what was measured.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        if args.command == "throughput":
            return _throughput(args)
        if args.command == "quality":
            args.out.mkdir(parents=True, exist_ok=True)
            return _quality(args)
        if args.command == "ffn":
            return _ffn(args)
        from elas_megatron.bench.report import read_results

        meta, rows = read_results(args.dir)
        _report(args.dir, meta, rows)
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
