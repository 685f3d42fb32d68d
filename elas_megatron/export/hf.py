# SPDX-License-Identifier: Apache-2.0
"""Megatron (TP=1) state dict -> Hugging Face LLaMA names; writers for the two export formats.

* ``hf`` (variants whose network is LLaMA: dense): a ``LlamaForCausalLM`` directory (``config.json``,
  ``model.safetensors`` or ``pytorch_model.bin``, ``generation_config.json``, the sentencepiece
  ``tokenizer.model``), loadable with ``transformers.LlamaForCausalLM.from_pretrained`` -- transformers is not
  needed to write it.
* ``torch`` (every variant with a ``standalone_mlp``): ``config.json`` + ``model.pt`` (a plain state dict) +
  ``modeling_elas.py``, the standalone inference module (:mod:`elas_megatron.export.modeling_elas`).

The mapping (docs/launch.md, "Export"): megatron's fused ``linear_qkv`` rows are ordered per query group as
``[the group's q heads | k | v]`` and are split into ``q_proj``/``k_proj``/``v_proj``; the fused SwiGLU
``linear_fc1`` is ``[gate; up]``; megatron's RoPE rotates halves (``rotate_half``), as HF LLaMA does, so q/k need
no permutation; RMSNorm eps and RoPE theta go to the config; the output layer is untied (``lm_head``). Low-rank
factors keep their orientation (``A``: ``[in, r]``, ``B``: ``[r, out]``) under the same module names. A variant
renames its own parameters first (:attr:`~elas_megatron.variants.base.Variant.export_renames`, e.g. ELAS's
non-gated ``linear_fc1`` is ``up_proj``) and says which formats can hold it
(:meth:`~elas_megatron.variants.base.Variant.check_export`).
"""
from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import torch

from elas_megatron.config.schema import Config
from elas_megatron.variants.registry import get_variant

__all__ = ["export_hf", "export_torch", "standalone_config", "to_llama_state_dict"]

logger = logging.getLogger(__name__)

_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")
_RENAME = {  # per-layer megatron suffix -> HF suffix (factors and full-rank weights alike)
    "input_layernorm.weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.linear_qkv.A_q": "self_attn.q_proj.A", "self_attention.linear_qkv.B_q": "self_attn.q_proj.B",
    "self_attention.linear_qkv.A_k": "self_attn.k_proj.A", "self_attention.linear_qkv.B_k": "self_attn.k_proj.B",
    "self_attention.linear_qkv.A_v": "self_attn.v_proj.A", "self_attention.linear_qkv.B_v": "self_attn.v_proj.B",
    "self_attention.linear_proj.A": "self_attn.o_proj.A", "self_attention.linear_proj.B": "self_attn.o_proj.B",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "mlp.linear_fc1.A_gate": "mlp.gate_proj.A", "mlp.linear_fc1.B_gate": "mlp.gate_proj.B",
    "mlp.linear_fc1.A_up": "mlp.up_proj.A", "mlp.linear_fc1.B_up": "mlp.up_proj.B",
    "mlp.linear_fc2.A": "mlp.down_proj.A", "mlp.linear_fc2.B": "mlp.down_proj.B",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
_GLOBAL = {"embedding.word_embeddings.weight": "embed_tokens.weight", "decoder.final_layernorm.weight": "norm.weight",
           "output_layer.weight": "lm_head.weight"}


def _split_qkv(weight: torch.Tensor, cfg: Config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """megatron fused qkv ``[(hq + 2 hkv), h]`` (per query group: q heads, k, v) -> q, k, v ``[out, h]``."""
    m = cfg.model
    head_dim = m.hidden_size // m.num_heads
    groups, per_group = m.kv_heads, m.num_heads // m.kv_heads
    w = weight.reshape(groups, per_group + 2, head_dim, -1)                    # [ng, np/ng + 2, hd, h]
    q = w[:, :per_group].reshape(m.num_heads * head_dim, -1)
    k = w[:, per_group].reshape(groups * head_dim, -1)
    v = w[:, per_group + 1].reshape(groups * head_dim, -1)
    return q, k, v


def to_llama_state_dict(megatron_state: dict, cfg: Config) -> dict[str, torch.Tensor]:
    """Rename a TP=1/PP=1 megatron ``GPTModel`` state dict to LLaMA names (``layers.{i}.self_attn.q_proj...``).

    Full-rank weights become ``...weight`` (``[out, in]``), low-rank factors ``...A`` / ``...B``. Keys of
    megatron's ``_extra_state`` are dropped; any other unknown key is an error (nothing is silently lost).
    """
    renames = get_variant(cfg.model.variant).export_renames
    out: dict[str, torch.Tensor] = {}
    for key, tensor in megatron_state.items():
        if key.endswith("_extra_state"):
            continue
        if key in _GLOBAL:
            out[_GLOBAL[key]] = tensor
            continue
        match = _LAYER.fullmatch(key)
        if match is None:
            raise KeyError(f"no LLaMA name for megatron parameter {key!r}")
        prefix, suffix = f"layers.{match.group(1)}.", match.group(2)
        if suffix in renames:
            out[prefix + renames[suffix]] = tensor
        elif suffix == "self_attention.linear_qkv.weight":
            for name, part in zip(("q", "k", "v"), _split_qkv(tensor, cfg), strict=True):
                out[f"{prefix}self_attn.{name}_proj.weight"] = part
        elif suffix == "mlp.linear_fc1.weight":
            gate, up = tensor.chunk(2, dim=0)                                   # [gate; up], each [f, h]
            out[f"{prefix}mlp.gate_proj.weight"] = gate
            out[f"{prefix}mlp.up_proj.weight"] = up
        elif suffix in _RENAME:
            out[prefix + _RENAME[suffix]] = tensor
        else:
            raise KeyError(f"no LLaMA name for megatron parameter {key!r}")
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def standalone_config(cfg: Config, vocab_size: int, *, sparse24: bool) -> dict:
    """``config.json`` of the ``torch`` format (:class:`modeling_elas.ElasConfig`)."""
    m = cfg.model
    variant = get_variant(m.variant)
    variant.check_export("torch")
    lowrank = variant.lowrank
    return {
        "format": "elas-megatron standalone v1",
        "variant": m.variant, "mlp": variant.standalone_mlp, "vocab_size": vocab_size, "hidden_size": m.hidden_size,
        "num_layers": m.num_layers,
        "num_heads": m.num_heads, "num_kv_heads": m.kv_heads, "ffn_hidden_size": m.ffn_hidden_size,
        "rank": m.rank if lowrank else 0,
        "attention_rank": m.attn_rank if variant.lowrank_attention(m) else 0,
        "lowrank_activation": m.lowrank_activation, "sparse24": bool(sparse24),
        # megatron builds RoPE with int(rope_base) (models/gpt.py): keep exactly that value
        "rope_theta": float(int(m.rope_base)), "norm_eps": m.norm_eps, "max_seq_len": cfg.train.seq_len,
    }


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) for k, v in state.items()}


def _copy_tokenizer(cfg: Config, out: Path) -> str | None:
    src = Path(cfg.data.tokenizer)
    if not src.is_file():
        logger.warning("tokenizer %s not found: the export has no tokenizer.model", src)
        return None
    shutil.copyfile(src, out / "tokenizer.model")
    return "tokenizer.model"


def export_torch(megatron_state: dict, cfg: Config, vocab_size: int, out: str | Path, *, sparse24: bool,
                 dtype: torch.dtype = torch.float32, extra: dict | None = None) -> Path:
    """Write the ``torch`` format (every variant with a ``standalone_mlp``): config.json, model.pt,
    modeling_elas.py, tokenizer.model. Raises ``ExportUnsupportedError`` (a ``ValueError``) for any other."""
    get_variant(cfg.model.variant).check_export("torch")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = _cast(to_llama_state_dict(megatron_state, cfg), dtype)
    torch.save(state, out / "model.pt")
    config = standalone_config(cfg, vocab_size, sparse24=sparse24) | {"torch_dtype": str(dtype).split(".")[-1]}
    config |= extra or {}
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    shutil.copyfile(Path(__file__).with_name("modeling_elas.py"), out / "modeling_elas.py")
    _copy_tokenizer(cfg, out)
    return out


def _tokenizer_ids(cfg: Config) -> dict:
    try:
        from elas_megatron.data.tokenizer import load_tokenizer

        tok = load_tokenizer(cfg.data.tokenizer)
    except (OSError, ImportError, ValueError):
        return {}
    return {k: v for k, v in (("bos_token_id", tok.bos_id), ("eos_token_id", tok.eos_id),
                              ("pad_token_id", tok.pad_id)) if v is not None and v >= 0}


def export_hf(megatron_state: dict, cfg: Config, vocab_size: int, out: str | Path, *,
              dtype: torch.dtype = torch.float32, extra: dict | None = None) -> Path:
    """Write a Hugging Face ``LlamaForCausalLM`` directory (LLaMA variants only: ``Variant.hf_llama``).

    Raises:
        ExportUnsupportedError (a ``ValueError``): the variant is not a LLaMA network (the message names the
            alternative).
    """
    m = cfg.model
    get_variant(m.variant).check_export("hf")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = _cast({("lm_head.weight" if k == "lm_head.weight" else f"model.{k}"): v
                   for k, v in to_llama_state_dict(megatron_state, cfg).items()}, dtype)
    ids = _tokenizer_ids(cfg)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": vocab_size, "hidden_size": m.hidden_size, "intermediate_size": m.ffn_hidden_size,
        "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_heads, "num_key_value_heads": m.kv_heads,
        "head_dim": m.hidden_size // m.num_heads, "hidden_act": "silu", "rms_norm_eps": m.norm_eps,
        "rope_theta": float(int(m.rope_base)), "rope_scaling": None, "max_position_embeddings": cfg.train.seq_len,
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "tie_word_embeddings": False,
        "initializer_range": m.init_std, "use_cache": True, "torch_dtype": str(dtype).split(".")[-1], **ids,
    }
    config |= extra or {}
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    (out / "generation_config.json").write_text(json.dumps({"_from_model_config": True, **ids}, indent=1) + "\n")
    try:
        from safetensors.torch import save_file
    except ImportError:
        torch.save(state, out / "pytorch_model.bin")
    else:
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    if _copy_tokenizer(cfg, out):
        (out / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False,
             "model_max_length": cfg.train.seq_len}, indent=1) + "\n")
    return out
