# SPDX-License-Identifier: Apache-2.0
"""Analytic parameter counts and training FLOPs per token of the variants (used for MFU).

Counts follow the built networks exactly (a unit test checks them against ``GPTModel``): LLaMA blocks with
RMSNorm gains, no biases, untied input embedding and output layer.

FLOPs per token of one training step (forward + backward), the PaLM appendix-B convention::

    flops_per_token = 6 * N_matmul + 12 * L * h_attn * s

``N_matmul`` = every weight that takes part in a matrix multiply (all linear / low-rank factors of the blocks
plus the output layer; not the input embedding, a lookup, nor the norms), ``6 = 2`` (multiply-add) ``x 3``
(forward, input grad, weight grad). ``12 L h_attn s`` is the attention score and value products
(``QK^T`` and ``PV``, ``2 * 2 * s * h_attn`` per token and layer forward, x3 for training) over the full
``s x s`` matrix, not halved for the causal mask, with ``h_attn = num_heads * head_dim``. Element-wise work
(norms, SiLU, squared ReLU, the 2:4 selection, softmax) is not counted.

The 2:4 sparsity of ELAS is counted as dense by default (``sparse_as_dense=True``): MFU then measures how well
the hardware runs the model's dense-equivalent work, and dense and ELAS runs are compared on the same
yardstick. With ``sparse_as_dense=False`` the product ``s @ A_down`` and its weight gradient ``s^T @ grad_z``
count half (their sparse operand has half the entries), i.e. ``4 d_ff r`` instead of ``6 d_ff r`` per layer.

``python -m elas_megatron.models.flops`` prints the table of the paper's model sizes (docs/model.md).
"""
from __future__ import annotations

import argparse

from elas_megatron.config.schema import ModelConfig
from elas_megatron.variants.registry import get_variant, variant_names

__all__ = [
    "PAPER_SEQ_LEN",
    "PAPER_SHAPES",
    "PAPER_VOCAB_SIZE",
    "count_parameters",
    "flops_per_token",
    "layer_matrix_parameters",
    "paper_model_config",
    "parameter_table",
]

PAPER_VOCAB_SIZE = 32000
"""T5 tokenizer vocabulary of the CoLA/ELAS experiments."""
PAPER_SEQ_LEN = 256

PAPER_SHAPES: dict[str, dict[str, int]] = {
    "60M": dict(hidden_size=512, num_layers=8, num_heads=8, ffn_hidden_size=1376, rank=128),
    "130M": dict(hidden_size=768, num_layers=12, num_heads=12, ffn_hidden_size=2048, rank=256),
    "350M": dict(hidden_size=1024, num_layers=24, num_heads=16, ffn_hidden_size=2736, rank=256),
    # The paper's d_ff = 5461 is rounded up to 5472 = 32 * 171, a multiple of 4 * tp for tp <= 8, so that 2:4
    # groups never straddle a TP shard; all three variants use the same width to stay comparable.
    "1B": dict(hidden_size=2048, num_layers=24, num_heads=32, ffn_hidden_size=5472, rank=512),
}
"""The model sizes of the CoLA / ELAS papers (LLaMA shapes of GaLore's benchmark)."""


def paper_model_config(size: str, variant: str) -> ModelConfig:
    """``ModelConfig`` of a paper size (``"60M"`` .. ``"1B"``) and variant, vocabulary 32000."""
    if size not in PAPER_SHAPES:
        raise ValueError(f"model size {size!r} is unknown; choose one of {list(PAPER_SHAPES)}")
    return ModelConfig(variant=variant, vocab_size=PAPER_VOCAB_SIZE, **PAPER_SHAPES[size])


def layer_matrix_parameters(model_cfg: ModelConfig, tp: int = 1) -> dict[str, int]:
    """Matrix parameters of one transformer layer on one tensor-parallel rank (``tp=1``: the whole layer).

    Tensor parallelism shards a full-rank column-parallel linear (q|k|v, the FFN's gate/up) along its outputs and
    a row-parallel one (o, the FFN's down) along its inputs. A low-rank ``sigma(x A) B`` column layer keeps
    ``A [in, r]`` whole (replicated) and shards ``B [r, out / tp]``; a row layer shards ``A [in / tp, r]`` and
    keeps ``B [r, out]`` whole. Norms are not included (``2 * hidden_size`` per layer, never sharded).

    Returns:
        ``attention`` (q, k, v, o), ``ffn`` (dense: SwiGLU gate, up, down; cola: the factors of those three;
        elas: the factors of up and down, no gate) and ``a_down`` (elas: the ``A`` factor of the down projection,
        which multiplies the 2:4-sparse activation; 0 for dense/cola). Each variant computes its own terms
        (:class:`~elas_megatron.variants.base.Variant`).
    """
    variant = get_variant(model_cfg.variant)
    return {"attention": variant.attention_matrix_parameters(model_cfg, tp),
            "ffn": variant.ffn_matrix_parameters(model_cfg, tp),
            "a_down": variant.sparse_operand_parameters(model_cfg, tp)}


def count_parameters(model_cfg: ModelConfig, vocab_size: int) -> dict[str, int]:
    """Parameter counts of the full (unsharded) model.

    Returns:
        ``embedding`` (input, ``V h``), ``output_layer`` (``V h``, untied), ``attention_per_block``,
        ``ffn_per_block``, ``norms_per_block``, ``block`` (one layer), ``blocks`` (all layers), ``final_norm``,
        ``non_embedding`` (= total minus embedding and output layer), ``total``.
    """
    m = model_cfg
    parts = layer_matrix_parameters(m)
    norms = 2 * m.hidden_size
    block = parts["attention"] + parts["ffn"] + norms
    embedding = output_layer = vocab_size * m.hidden_size
    blocks = m.num_layers * block
    final_norm = m.hidden_size
    total = embedding + output_layer + blocks + final_norm
    return {"embedding": embedding, "output_layer": output_layer, "attention_per_block": parts["attention"],
            "ffn_per_block": parts["ffn"], "norms_per_block": norms, "block": block, "blocks": blocks,
            "final_norm": final_norm, "non_embedding": blocks + final_norm, "total": total}


def flops_per_token(model_cfg: ModelConfig, vocab_size: int, seq_len: int, *, sparse_as_dense: bool = True) -> float:
    """Training FLOPs per token (forward + backward) of one sequence of ``seq_len`` tokens; see module docstring."""
    m = model_cfg
    parts = layer_matrix_parameters(m)
    matmul_params = m.num_layers * (parts["attention"] + parts["ffn"]) + vocab_size * m.hidden_size
    flops = 6.0 * matmul_params
    flops += 12.0 * m.num_layers * (m.num_heads * (m.hidden_size // m.num_heads)) * seq_len
    if not sparse_as_dense and get_variant(m.variant).sparse_active(m):
        flops -= 2.0 * m.num_layers * parts["a_down"]
    return flops


def parameter_table(vocab_size: int = PAPER_VOCAB_SIZE, seq_len: int = PAPER_SEQ_LEN) -> str:
    """Markdown table: parameters (M) and training GFLOPs/token of every variant at every paper size."""
    rows = ["| size | variant | total (M) | non-embedding (M) | attention/block (M) | FFN/block (M) | "
            "GFLOPs/token (train) |", "|---|---|---:|---:|---:|---:|---:|"]
    for size in PAPER_SHAPES:
        for variant in variant_names():
            m = paper_model_config(size, variant)
            c = count_parameters(m, vocab_size)
            rows.append(f"| {size} | {variant} | {c['total'] / 1e6:.1f} | {c['non_embedding'] / 1e6:.1f} | "
                        f"{c['attention_per_block'] / 1e6:.3f} | {c['ffn_per_block'] / 1e6:.3f} | "
                        f"{flops_per_token(m, vocab_size, seq_len) / 1e9:.3f} |")
    return "\n".join(rows)


def main() -> None:
    """Print :func:`parameter_table` (``python -m elas_megatron.models.flops [--vocab-size V] [--seq-len S]``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-size", type=int, default=PAPER_VOCAB_SIZE)
    parser.add_argument("--seq-len", type=int, default=PAPER_SEQ_LEN)
    args = parser.parse_args()
    print(parameter_table(args.vocab_size, args.seq_len))


if __name__ == "__main__":
    main()
