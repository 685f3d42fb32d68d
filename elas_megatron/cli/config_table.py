# SPDX-License-Identifier: Apache-2.0
"""Generate docs/configs.md: every shipped config with its parameters, FLOPs/token, ranks and memory per GPU.

``python -m elas_megatron.cli.config_table --write docs/configs.md`` regenerates it; ``--check`` exits 1 when the file
is stale (a unit test runs the check). Each model size is composed the way it is meant to run: ``configs/c4.yaml``
+ ``configs/model/<size>.yaml`` + ``configs/variant/<variant>.yaml`` + the layout in :data:`LAYOUT_FOR_SIZE`, on
that layout's GPU count, with the T5 vocabulary (32000) of the C4 recipe. Numbers come from
:mod:`elas_megatron.models.flops` and :mod:`elas_megatron.training.memory` (formulas in docs/model.md and
docs/launch.md).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from elas_megatron.config.loader import load_config, load_yaml_tree
from elas_megatron.config.schema import CheckpointConfig, LogConfig
from elas_megatron.variants.registry import get_variant, variant_names

__all__ = ["LAYOUT_FOR_SIZE", "field_docs", "render"]

REPO = Path(__file__).resolve().parents[2]
VOCAB_SIZE = 32000
LAYOUT_FOR_SIZE: dict[str, tuple[str, int]] = {
    "60m": ("dp8", 8), "130m": ("dp8", 8), "350m": ("dp8", 8), "1b": ("dp8", 8), "3b": ("tp2", 8),
    "7b": ("tp4-pp2", 32),
}
"""Model size -> (layout file stem, GPUs) used for the memory columns; sizes not listed use dp8 on 8 GPUs."""


def _shipped_variants(root: Path) -> list[str]:
    """Registered variants that ship a ``configs/variant/<name>.yaml``, in registration order."""
    return [name for name in variant_names() if (root / f"configs/variant/{name}.yaml").is_file()]


def _size_key(path: Path) -> float:
    stem = path.stem.lower()
    return float(stem[:-1]) * (1e3 if stem.endswith("b") else 1.0)


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f}"


def _model_rows(root: Path) -> list[str]:
    from elas_megatron.models.flops import count_parameters, flops_per_token
    from elas_megatron.training.memory import estimate_memory

    rows = [("| size | variant | parameters (M) | non-embedding (M) | rank r / attention r | GFLOPs/token (train) | "
            "layout | GPUs | GiB/GPU: weights+grads+optimizer / activations / total |"),
            "|---|---|---:|---:|---|---:|---|---:|---|"]
    for model_file in sorted((root / "configs/model").glob("*.yaml"), key=_size_key):
        layout, gpus = LAYOUT_FOR_SIZE.get(model_file.stem, ("dp8", 8))
        for variant in _shipped_variants(root):
            files = [root / "configs/c4.yaml", model_file, root / f"configs/variant/{variant}.yaml",
                     root / f"configs/layout/{layout}.yaml"]
            cfg = load_config(files, world_size=gpus)
            m = cfg.model
            counts = count_parameters(m, VOCAB_SIZE)
            ranks = (f"{m.rank} / {m.attn_rank if m.lowrank_attention else 'full'}" if get_variant(variant).lowrank
                     else "full")
            peak = estimate_memory(cfg, world_size=gpus, vocab_size=VOCAB_SIZE).peak
            states = peak.weights + peak.grads + peak.optimizer
            rows.append(f"| {model_file.stem} | {variant} | {counts['total'] / 1e6:.1f} | "
                        f"{counts['non_embedding'] / 1e6:.1f} | {ranks} | "
                        f"{flops_per_token(m, VOCAB_SIZE, cfg.train.seq_len) / 1e9:.3f} | {layout} | {gpus} | "
                        f"{_gib(states)} / {_gib(peak.activations)} / {_gib(peak.total)} |")
    return rows


def _layout_rows(root: Path) -> list[str]:
    rows = ["| layout | tp | pp | vpp | sequence parallel | optimizer | zero_stage | recompute | micro_batch |",
            "|---|---:|---:|---:|---|---|---:|---|---:|"]
    for path in sorted((root / "configs/layout").glob("*.yaml")):
        tree = load_yaml_tree(path)
        p, t = tree.get("parallel", {}), tree.get("train", {})
        rows.append(f"| {path.stem} | {p.get('tp', 1)} | {p.get('pp', 1)} | {p.get('vpp') or '-'} | "
                    f"{'on' if p.get('sequence_parallel') else 'off'} | {p.get('optimizer', 'megatron')} | "
                    f"{p.get('zero_stage', 0)} | {p.get('recompute', 'none')} | {t.get('micro_batch', '(base)')} |")
    return rows


def _demo_row(root: Path) -> list[str]:
    from elas_megatron.data.tokenizer import load_tokenizer
    from elas_megatron.models.flops import count_parameters, flops_per_token

    cfg = load_config([root / "configs/demo.yaml"], world_size=1)
    vocab = load_tokenizer(root / cfg.data.tokenizer).vocab_size
    counts = count_parameters(cfg.model, vocab)
    return [(f"`configs/demo.yaml` (no composition): {cfg.model.variant}, {counts['total'] / 1e6:.2f}M parameters "
            f"({counts['non_embedding'] / 1e6:.2f}M non-embedding), rank {cfg.model.rank}, vocabulary {vocab} "
            f"(the shipped demo tokenizer), {flops_per_token(cfg.model, vocab, cfg.train.seq_len) / 1e6:.2f} "
            f"MFLOPs/token, {cfg.train.steps} steps of {cfg.train.global_batch} x {cfg.train.seq_len} tokens.")]


def field_docs(cls: type) -> dict[str, str]:
    """A config dataclass's field docstrings (the string literal right under each field in
    :mod:`elas_megatron.config.schema`), one line each; fields without one map to ''."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs: dict[str, str] = {}
    for node, after in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            text = (after.value.value if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str) else "")
            docs[node.target.id] = " ".join(text.split())
    return docs


def _option_rows(cls: type, section: str) -> list[str]:
    """``| key | default | meaning |`` for every field of a config section."""
    from dataclasses import MISSING, fields

    docs = field_docs(cls)
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for f in fields(cls):
        default = f.default if f.default is not MISSING else f.default_factory()
        text = "null" if default is None else str(default).lower() if isinstance(default, bool) else default
        rows.append(f"| `{section}.{f.name}` | `{text}` | {docs.get(f.name, '').replace('|', '/')} |")
    return rows


def render(root: Path = REPO) -> str:
    """The whole of docs/configs.md."""
    lines = [
        "# Shipped configs",
        "",
        "<!-- Generated by `python -m elas_megatron.cli.config_table --write docs/configs.md`; "
        "do not edit by hand. -->",
        "",
        ("A run composes `configs/c4.yaml` (the C4 recipe: data, optimizer, batch 512 x 256 tokens), one size from "
        "`configs/model/`, one variant from `configs/variant/` and one layout from `configs/layout/`:"),
        "",
        "```bash",
        ("launch/submit.sh --nodes=1 -- configs/c4.yaml configs/model/1b.yaml configs/variant/elas.yaml "
        "configs/layout/dp8.yaml"),
        "```",
        "",
        (f"Parameters and FLOPs with the T5 vocabulary ({VOCAB_SIZE}), untied embeddings included in the total; "
        "FLOPs/token of a training step (forward + backward, 2:4 counted dense; docs/model.md). \"rank\" is the "
        "low-rank width `r` (`model.rank`) and the attention projections' `r_a`. Memory per GPU is the dry-run "
        "estimate (docs/launch.md) on the layout each size is meant for, bf16 with fp32 master weights and Adam, at "
        "the pipeline stage that needs the most; `elas-train --dry-run` prints it for any composition."),
        "",
        *_model_rows(root),
        "",
        ("`model.variant` is any variant in the registry of `elas_megatron.variants` (built in: `dense`, `cola`, "
        "`elas`; docs/model.md, \"Variants\"); the table "
        "lists those with a `configs/variant/<name>.yaml`. The variant files set only the variant's own keys: "
        "`model.kernel_backend` (`auto` | `reference` | `triton` | `cusparselt`, how the ELAS 2:4 FFN core runs; "
        "docs/kernels.md) is a run choice, `auto` by default (the fastest GPU path on CUDA, the reference on CPU)."),
        "",
        "## Layouts",
        "",
        *_layout_rows(root),
        "",
        ("`zero_stage` >= 1 with the megatron optimizer is the distributed optimizer (fp32 master weights and Adam "
        "states sharded over data parallelism). `micro_batch` overrides the recipe's 64."),
        "",
        "## Demo",
        "",
        *_demo_row(root),
        "",
        "## Log options",
        "",
        ("The `log` section (from the field documentation in `elas_megatron/config/schema.py`); `metrics.jsonl`, "
        "TensorBoard, the console line and profiling are described in docs/monitoring.md."),
        "",
        *_option_rows(LogConfig, "log"),
        "",
        "## Checkpoint options",
        "",
        ("The `checkpoint` section (from `elas_megatron/config/schema.py`); what a save and a load guarantee, and "
        "how to recover, is in docs/reliability.md."),
        "",
        *_option_rows(CheckpointConfig, "checkpoint"),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m elas_megatron.cli.config_table",
                                     description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", type=Path, help="write the table to this file")
    group.add_argument("--check", type=Path, help="exit 1 if this file differs from the generated table")
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        args.write.write_text(text)
    elif args.check:
        if not args.check.is_file() or args.check.read_text() != text:
            print(f"{args.check} is stale: run python -m elas_megatron.cli.config_table --write {args.check}",
                  file=sys.stderr)
            return 1
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
