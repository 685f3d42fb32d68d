# SPDX-License-Identifier: Apache-2.0
"""``elas-train --dry-run`` / ``python -m elas_megatron.cli.dryrun``: check a run before it takes a GPU.

Validates the config and the parallel layout against the world size, checks that the tokenizer and the data
prefixes exist, and prints the layout, the batch arithmetic (micro-batches per step, tokens per step and in
total), parameter counts, FLOPs, and the per-GPU memory estimate of :mod:`elas_megatron.training.memory`
(weights, gradients, optimizer states, activations under every recompute option). Imports neither torch nor
megatron, so it answers in about a second on a login node; ``launch/torchrun.sh`` runs it before torchrun.

Exit status: 0 when the run can start, 2 on a config, layout or data error (one line each on stderr).
"""
from __future__ import annotations

import argparse
import os
import sys

from elas_megatron.config.schema import Config

__all__ = ["assumed_device", "check_data", "load_config_or_report", "main", "render_report", "resolve_vocab_size"]


def resolve_vocab_size(cfg: Config, override: int | None) -> tuple[int, str] | None:
    """(vocabulary size, where it came from): ``--vocab-size``, ``model.vocab_size`` or the tokenizer file.

    None when none of them is known (no flag, no ``model.vocab_size`` and no tokenizer on disk).
    """
    if override is not None:
        return override, "--vocab-size"
    if cfg.model.vocab_size is not None:
        return cfg.model.vocab_size, "model.vocab_size"
    if os.path.isfile(cfg.data.tokenizer):
        from elas_megatron.data.tokenizer import load_tokenizer

        return load_tokenizer(cfg.data.tokenizer).vocab_size, cfg.data.tokenizer
    return None


def assumed_device(cfg: Config) -> tuple[str, str, str]:
    """(device, dtype, why) the memory estimate assumes: the run's ``train.device``/``train.dtype`` when set, else
    GPU bf16 (a cluster run; ``train.dtype=auto`` means bf16 on CUDA)."""
    t = cfg.train
    device = "CPU" if t.device == "cpu" else "GPU"
    if t.dtype != "auto":
        dtype = t.dtype
    else:
        dtype = "fp32" if t.device == "cpu" else "bf16"
    if t.device == "auto" and t.dtype == "auto":
        why = "train.device=auto, train.dtype=auto: a GPU run; set train.device=cpu for a CPU run's fp32 estimate"
    else:
        why = f"train.device={t.device}, train.dtype={t.dtype}"
    return device, dtype, why


def check_data(cfg: Config) -> list[str]:
    """Problems that would stop the run at start-up: a missing tokenizer or indexed-dataset file."""
    problems = []
    if not os.path.isfile(cfg.data.tokenizer):
        problems.append(f"data.tokenizer={cfg.data.tokenizer!r} does not exist; prepare it (docs/data.md), fix "
                        "the path, or plan without data: --dry-run --no-data-check")
    prefixes = [("data.train_prefixes", p) for p in cfg.data.train_prefixes]
    prefixes += [("data.valid_prefixes", p) for p in cfg.data.valid_prefixes or []]
    for key, prefix in prefixes:
        missing = [ext for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]
        if missing:
            problems.append(f"{key}: {prefix}{'/'.join(missing)} does not exist; run elas-prep or fix the prefix")
    if not problems:
        from elas_megatron.data.vocab import check_data_vocabulary

        problems += check_data_vocabulary(cfg.data)
    return problems


def _count(n: float) -> str:
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:g}"


def _gib(n_bytes: float) -> str:
    from elas_megatron.training.memory import GIB

    return f"{n_bytes / GIB:7.2f} GiB"


def render_report(cfg: Config, *, world_size: int, vocab_size: int, vocab_source: str,
                  gpu_memory_gib: float | None = None) -> list[str]:
    """The dry-run report, one string per line."""
    from elas_megatron.models.flops import count_parameters, flops_per_token
    from elas_megatron.training.memory import RECOMPUTE_MODES, estimate_memory
    from elas_megatron.variants.registry import get_variant

    m, p, t = cfg.model, cfg.parallel, cfg.train
    est = estimate_memory(cfg, world_size=world_size, vocab_size=vocab_size)
    counts = count_parameters(m, vocab_size)
    fpt = flops_per_token(m, vocab_size, t.seq_len)
    tokens_per_step = t.global_batch * t.seq_len
    total_tokens = tokens_per_step * t.steps
    if p.optimizer == "megatron":
        opt = f"megatron, {'distributed optimizer' if p.zero_stage >= 1 else 'replicated optimizer'}"
    else:
        opt = f"deepspeed ZeRO-{p.zero_stage}"
    ranks = f", rank {m.rank}, attention rank {m.attn_rank if m.lowrank_attention else 'full'}" \
        if get_variant(m.variant).lowrank else ""
    lines = [
        (f"layout       world {world_size} = dp {est.dp} x tp {p.tp} x pp {p.pp} (vpp {p.vpp or '-'}, "
        f"sequence parallel {'on' if p.sequence_parallel else 'off'}); optimizer {opt}; recompute {p.recompute}"),
        (f"batch        global {t.global_batch} sequences = micro {t.micro_batch} x dp {est.dp} x "
        f"{est.num_microbatches} micro-batches; {t.seq_len} tokens each; {tokens_per_step:,} tokens/step"),
        (f"schedule     {t.steps:,} steps = {_count(total_tokens)} tokens "
        f"({total_tokens / counts['total']:.1f} tokens/parameter); eval every {t.eval_every or 'end'}, "
        f"checkpoint every {cfg.checkpoint.every or 'end'}"),
        (f"model        {m.variant}: {counts['total'] / 1e6:.1f}M parameters ({counts['non_embedding'] / 1e6:.1f}M "
        f"non-embedding), h {m.hidden_size} x {m.num_layers} layers, {m.num_heads} heads, d_ff "
        f"{m.ffn_hidden_size}{ranks}; vocab {vocab_size} ({vocab_source})"),
        (f"compute      {fpt / 1e9:.3f} GFLOPs/token (train, 2:4 counted dense) = {fpt * total_tokens:.3g} FLOPs "
        "in total"),
    ]
    peak = est.peak
    bpp = est.bytes_per_param
    device, dtype, why = assumed_device(cfg)
    where = f", pipeline stage {peak.stage} of {p.pp} ({peak.layers} layers)" if p.pp > 1 else ""
    lines += [
        f"memory/{device}   estimate for {device} {dtype} ({why}){where}; {peak.params / 1e6:.1f}M parameters "
        f"on this {device}",
        f"  weights     {_gib(peak.weights)}  ({bpp['weights']:g} B/param)",
        f"  grads       {_gib(peak.grads)}  ({bpp['grads']:g} B/param)",
        f"  optimizer   {_gib(peak.optimizer)}  ({bpp['optimizer']:.4g} B/param)",
        (f"  activations {_gib(peak.activations)}  (recompute {p.recompute}; micro-batch {t.micro_batch} x "
        f"{t.seq_len} tokens{'; elas dense warm-up peak' if est.dense_warmup else ''})"),
        f"  total       {_gib(peak.total)}",
        "  activations by recompute: " + ", ".join(
            f"{mode} {peak.activations_by_recompute[mode] / 2**30:.2f}" for mode in RECOMPUTE_MODES) + " GiB",
    ]
    if gpu_memory_gib is not None and peak.total > 0.9 * gpu_memory_gib * 2**30:
        fixes = ["lower train.micro_batch"]
        if p.recompute != "full":
            fixes.append("set parallel.recompute" + ("=full" if p.recompute != "none" else ""))
        if p.zero_stage < 1:
            fixes.append("parallel.zero_stage=1")
        fixes.append("a larger parallel.tp/pp")
        lines.append(f"WARNING      the estimate exceeds 90% of {gpu_memory_gib:g} GiB per GPU: "
                     + ", ".join(fixes[:-1]) + " or " + fixes[-1])
    return lines


def load_config_or_report(args: list[str], *, world_size: int, prog: str) -> Config | None:
    """The config of ``args`` (YAML files, then ``section.key=value`` overrides) validated for ``world_size``; None
    after printing ``PROG: config error: ...`` on stderr."""
    from elas_megatron.config import ConfigError, load_config

    try:
        return load_config([a for a in args if "=" not in a], [a for a in args if "=" in a], world_size=world_size)
    except ConfigError as exc:
        print(f"{prog}: config error: {exc}", file=sys.stderr)
        return None


def dry_run(args: list[str], *, world_size: int, vocab_size: int | None = None, check_files: bool = True,
            gpu_memory_gib: float | None = None, quiet: bool = False, prog: str = "elas-train --dry-run") -> int:
    """Validate and report; returns the exit status (0 ok, 2 error). ``args``: YAML files then overrides."""
    cfg = load_config_or_report(args, world_size=world_size, prog=prog)
    if cfg is None:
        return 2
    configs = [a for a in args if "=" not in a]
    overrides = [a for a in args if "=" in a]
    problems = check_data(cfg) if check_files else []
    for problem in problems:
        print(f"{prog}: data error: {problem}", file=sys.stderr)
    if problems:
        return 2
    resolved = resolve_vocab_size(cfg, vocab_size)
    if resolved is None:
        print(f"{prog}: config error: the vocabulary size is unknown: data.tokenizer={cfg.data.tokenizer!r} does "
              "not exist and model.vocab_size is not set; set model.vocab_size or pass --vocab-size N (32000 for "
              "the T5 tokenizer)", file=sys.stderr)
        return 2
    vocab, source = resolved
    if vocab % cfg.parallel.tp != 0:
        print(f"{prog}: config error: vocabulary {vocab} is not divisible by parallel.tp={cfg.parallel.tp}; set "
              f"model.vocab_size to a multiple of {cfg.parallel.tp}", file=sys.stderr)
        return 2
    if not quiet:
        device = assumed_device(cfg)[0]
        print(f"{prog}: {' '.join(configs + overrides)} on {world_size} {device}(s): OK")
        for line in render_report(cfg, world_size=world_size, vocab_size=vocab, vocab_source=source,
                                  gpu_memory_gib=gpu_memory_gib):
            print(line)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m elas_megatron.cli.dryrun", description=__doc__.splitlines()[0])
    parser.add_argument("args", nargs="+", metavar="CONFIG.yaml | section.key=value")
    parser.add_argument("--world-size", type=int, default=None,
                        help="GPUs of the run (default: --nnodes x --nproc-per-node, else $WORLD_SIZE, else 1)")
    parser.add_argument("--nnodes", type=int, default=1)
    parser.add_argument("--nproc-per-node", type=int, default=None)
    parser.add_argument("--vocab-size", type=int, default=None, help="instead of model.vocab_size / the tokenizer")
    parser.add_argument("--no-data-check", action="store_true", help="do not require the tokenizer and data files")
    parser.add_argument("--gpu-memory-gib", type=float, default=None, help="warn when the estimate exceeds 90%% of it")
    parser.add_argument("--quiet", action="store_true", help="validate only; print nothing when valid")
    ns = parser.parse_intermixed_args(argv)
    if ns.world_size is not None:
        world = ns.world_size
    elif ns.nproc_per_node is not None:
        world = ns.nnodes * ns.nproc_per_node
    else:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 1:
        parser.error(f"the world size must be positive, got {world}")
    return dry_run(ns.args, world_size=world, vocab_size=ns.vocab_size, check_files=not ns.no_data_check,
                   gpu_memory_gib=ns.gpu_memory_gib, quiet=ns.quiet, prog="dry-run")


if __name__ == "__main__":
    sys.exit(main())
