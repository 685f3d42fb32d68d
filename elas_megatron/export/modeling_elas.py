# SPDX-License-Identifier: Apache-2.0
"""Standalone inference for models exported by ``elas-export``: plain PyTorch, one file, no megatron.

``elas-export`` copies this file into the export directory next to ``config.json`` and ``model.pt`` (a plain
state dict), so the directory works anywhere torch >= 2.4 does::

    import sys; sys.path.insert(0, "export_dir")
    from modeling_elas import ElasForCausalLM
    model = ElasForCausalLM.from_pretrained("export_dir")
    logits = model(input_ids)                        # [b, s] -> [b, s, vocab], float
    ids = model.generate(input_ids, max_new_tokens=20)  # greedy

The network is the one trained (docs/model.md): LLaMA blocks (RMSNorm, RoPE, causal attention with grouped
query heads, no biases, untied embeddings) whose linear maps are either full rank (``weight``: ``[out, in]``, as
``nn.Linear``) or CoLA's low-rank ``sigma(x A) B`` (``A``: ``[in, r]``, ``B``: ``[r, out]``). FFN:

* ``config.mlp == "swiglu"`` (dense, cola): SwiGLU ``down(silu(gate(x)) * up(x))``;
* ``config.mlp == "relu2"`` (elas): ``down(sparse24(relu(up(x)) ** 2))``, where ``sparse24`` keeps the 2
  largest-magnitude entries of every 4 consecutive features (ties to the lower index), unless
  ``config.sparse24`` is false.

``config.rank`` / ``attention_rank`` of 0 mean full-rank FFN / attention. (Exports written before ``mlp`` was a
field name only the variant: elas means ``relu2``, the others ``swiglu``.)

State-dict names follow Hugging Face's LLaMA (``layers.{i}.self_attn.q_proj``, ``mlp.gate_proj``, ...).
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ElasConfig", "ElasForCausalLM", "sparse24"]

CONFIG_FILE = "config.json"
MLP_KINDS = ("swiglu", "relu2")
WEIGHTS_FILE = "model.pt"


@dataclasses.dataclass
class ElasConfig:
    variant: str                      # the training variant's name (informational)
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    ffn_hidden_size: int
    rank: int = 0                     # low-rank width r of the FFN (cola/elas)
    attention_rank: int = 0           # r of q, k, v, o; 0 = full-rank attention
    lowrank_activation: str = "silu"  # sigma: silu | identity
    sparse24: bool = True             # elas: 2:4 activation sparsity at inference
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    max_seq_len: int = 2048           # the training sequence length (RoPE itself has no hard limit)
    mlp: str = "swiglu"               # FFN: swiglu | relu2 (see the module docstring)

    @classmethod
    def from_dict(cls, d: dict) -> ElasConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        d = dict(d)
        if d.get("mlp") is None:      # older exports: only the variant named the FFN
            d["mlp"] = "relu2" if d.get("variant") == "elas" else "swiglu"
        if d["mlp"] not in MLP_KINDS:
            raise ValueError(f"config mlp={d['mlp']!r} is unknown; this modeling_elas.py knows {MLP_KINDS}")
        return cls(**{k: v for k, v in d.items() if k in names})


def sparse24(x: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest-magnitude entries of every 4 consecutive features (ties to the lower index)."""
    groups = x.reshape(*x.shape[:-1], -1, 4)                                  # [..., f/4, 4]
    order = torch.argsort(groups.abs(), dim=-1, descending=True, stable=True)
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order[..., :2], True)
    return (groups * mask).reshape(x.shape)


class LowRank(nn.Module):
    """``sigma(x A) B``."""

    def __init__(self, in_features: int, out_features: int, rank: int, activation: str) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(in_features, rank))
        self.B = nn.Parameter(torch.empty(rank, out_features))
        self.activation = F.silu if activation == "silu" else (lambda t: t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(x @ self.A) @ self.B


def _linear(cfg: ElasConfig, in_features: int, out_features: int, rank: int) -> nn.Module:
    if rank:
        return LowRank(in_features, out_features, rank, cfg.lowrank_activation)
    return nn.Linear(in_features, out_features, bias=False)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ElasConfig) -> None:
        super().__init__()
        h, r = cfg.hidden_size, cfg.attention_rank
        self.n_heads, self.n_kv = cfg.num_heads, cfg.num_kv_heads
        self.head_dim = h // cfg.num_heads
        self.q_proj = _linear(cfg, h, self.n_heads * self.head_dim, r)
        self.k_proj = _linear(cfg, h, self.n_kv * self.head_dim, r)
        self.v_proj = _linear(cfg, h, self.n_kv * self.head_dim, r)
        self.o_proj = _linear(cfg, self.n_heads * self.head_dim, h, r)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)     # [b, nh, s, hd]
        k = self.k_proj(x).view(b, s, self.n_kv, self.head_dim).transpose(1, 2)        # [b, nkv, s, hd]
        v = self.v_proj(x).view(b, s, self.n_kv, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if self.n_kv != self.n_heads:                                                   # query head j uses kv head
            k = k.repeat_interleave(self.n_heads // self.n_kv, dim=1)                   # j // (nh / nkv)
            v = v.repeat_interleave(self.n_heads // self.n_kv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=s > 1)                    # [b, nh, s, hd]
        return self.o_proj(y.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ElasConfig) -> None:
        super().__init__()
        h, f, r = cfg.hidden_size, cfg.ffn_hidden_size, cfg.rank
        self.gated, self.sparse = cfg.mlp == "swiglu", cfg.sparse24
        if self.gated:
            self.gate_proj = _linear(cfg, h, f, r)
        self.up_proj = _linear(cfg, h, f, r)
        self.down_proj = _linear(cfg, f, h, r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        y2 = torch.relu(self.up_proj(x)) ** 2
        return self.down_proj(sparse24(y2) if self.sparse else y2)


class Block(nn.Module):
    def __init__(self, cfg: ElasConfig) -> None:
        super().__init__()
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class ElasForCausalLM(nn.Module):
    """The exported language model; ``forward(input_ids [b, s]) -> logits [b, s, vocab]``."""

    def __init__(self, cfg: ElasConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        head_dim = cfg.hidden_size // cfg.num_heads
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _rope(self, seq_len: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(seq_len, device=self.inv_freq.device, dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)                                          # [s, hd]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)                                                 # [b, s, h]
        cos, sin = self._rope(input_ids.shape[1], x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x)).float()

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, eos_id: int | None = None) -> torch.Tensor:
        """Greedy decoding (recomputes the prefix each step: small models and tests, not serving)."""
        ids = input_ids
        for _ in range(max_new_tokens):
            nxt = self(ids)[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
            if eos_id is not None and bool((nxt == eos_id).all()):
                break
        return ids

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, map_location: str | torch.device = "cpu") -> ElasForCausalLM:
        """Load ``config.json`` + ``model.pt`` written by ``elas-export``; returns the model in eval mode."""
        directory = Path(directory)
        cfg = ElasConfig.from_dict(json.loads((directory / CONFIG_FILE).read_text()))
        model = cls(cfg)
        state = torch.load(directory / WEIGHTS_FILE, map_location=map_location, weights_only=True)
        model.load_state_dict(state)
        dtype = next(iter(state.values())).dtype
        return model.to(dtype=dtype, device=map_location).eval()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def perplexity(self, input_ids: torch.Tensor) -> float:
        """exp(mean next-token loss) of ``input_ids`` [b, s]."""
        logits = self(input_ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))
        return math.exp(loss.item())
