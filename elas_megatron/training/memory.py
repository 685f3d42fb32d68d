# SPDX-License-Identifier: Apache-2.0
"""Per-GPU memory estimate of a training run: weights, gradients, optimizer states and activations.

Pure arithmetic on the config (no torch, no model build), so ``elas-train --dry-run`` can run on a login node.
docs/launch.md ("Memory estimate") states every formula used here; this module is their one implementation.

* **Model states** (bytes per parameter held by this GPU, ``d`` = data-parallel size):
  bf16 training with megatron's optimizer keeps bf16 weights (2), an fp32 gradient buffer (4, the trainer sets
  ``grad_reduce_in_fp32``) and fp32 master weights + Adam ``m``, ``v`` (12): 18 bytes/param, or ``6 + 12 / d``
  with the distributed optimizer (``parallel.zero_stage >= 1``). fp32 training: ``4 + 4 + 8`` (no master copy).
  DeepSpeed ZeRO stage 1/2/3 partitions the optimizer states / + gradients / + weights over ``d``.
* **Parameters per GPU**: tensor parallelism shards full-rank weights, the vocabulary and the ``B`` of column-style
  / ``A`` of row-style low-rank layers; replicated factors and norms stay whole (per layer:
  :func:`elas_megatron.models.flops.layer_matrix_parameters`). Pipeline stages hold their layers;
  the first also the embedding, the last the output layer and final norm.
* **Activations** of one micro-batch, per layer and token: the tensors autograd keeps for the backward on the GPU
  path (flash/SDPA attention, fused SwiGLU, fused ELAS kernel that saves the 2:4-compressed activation), listed by
  :func:`layer_activation_terms`; recomputation drops the terms its checkpoint re-creates. Pipelining keeps
  several micro-batches in flight (1F1B: ``pp - stage``; interleaved: Megatron's warm-up count).

It is an estimate: allocator fragmentation, the CUDA context, NCCL buffers and transient backward buffers come on
top (keep ~10-20 % headroom).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from elas_megatron.config.schema import Config, ModelConfig
from elas_megatron.models.flops import layer_matrix_parameters
from elas_megatron.variants.registry import get_variant

__all__ = [
    "GIB",
    "RECOMPUTE_MODES",
    "ActivationTerm",
    "MemoryEstimate",
    "StageMemory",
    "activation_dtype_bytes",
    "available_memory",
    "estimate_memory",
    "in_flight_chunks",
    "layer_activation_terms",
    "parameters_per_gpu",
    "stage_layers",
    "state_bytes_per_param",
]

GIB = 1024 ** 3
RECOMPUTE_MODES = ("none", "selective", "ffn", "full")


def activation_dtype_bytes(cfg: Config) -> int:
    """Bytes of one activation element: ``train.dtype`` (auto: bf16 on GPUs, fp32 when ``train.device=cpu``)."""
    if cfg.train.dtype == "fp32" or (cfg.train.dtype == "auto" and cfg.train.device == "cpu"):
        return 4
    return 2


def _attention_backend(m: ModelConfig, cfg: Config) -> str:
    if m.attention_backend != "auto":
        return m.attention_backend
    return "local" if cfg.train.device == "cpu" else "sdpa"


# ------------------------------------------------------------------------------------------------- parameters
def stage_layers(cfg: Config) -> list[int]:
    """Transformer layers on each pipeline stage (megatron's split incl. ``first/last_stage_layers``)."""
    L, pp = cfg.model.num_layers, cfg.parallel.pp
    first, last = cfg.parallel.first_stage_layers, cfg.parallel.last_stage_layers
    if pp == 1:
        return [L]
    fixed = {0: first, pp - 1: last}
    rest_stages = [s for s in range(pp) if fixed.get(s) is None]
    rest_layers = L - sum(v for v in fixed.values() if v is not None)
    out = []
    for s in range(pp):
        if fixed.get(s) is not None:
            out.append(fixed[s])
        else:
            out.append(rest_layers // len(rest_stages))
    return out


def parameters_per_gpu(cfg: Config, vocab_size: int) -> list[int]:
    """Parameters held by one GPU of each pipeline stage (the TP shard of that stage's modules)."""
    m, tp = cfg.model, cfg.parallel.tp
    layers = stage_layers(cfg)
    matrices = layer_matrix_parameters(m, tp)
    per_layer = matrices["attention"] + matrices["ffn"] + 2 * m.hidden_size        # + the two RMSNorm gains
    out = []
    for s, n in enumerate(layers):
        params = n * per_layer
        if s == 0:
            params += vocab_size * m.hidden_size // tp                  # embedding (vocab-parallel)
        if s == len(layers) - 1:
            params += vocab_size * m.hidden_size // tp + m.hidden_size  # output layer + final norm
        out.append(params)
    return out


def state_bytes_per_param(cfg: Config, dp: int) -> dict[str, float]:
    """Bytes per parameter of ``weights``, ``grads`` and ``optimizer`` on one GPU (see module docstring)."""
    p = cfg.parallel
    bf16 = activation_dtype_bytes(cfg) == 2
    weights, grads, optimizer = (2.0, 4.0, 12.0) if bf16 else (4.0, 4.0, 8.0)
    if p.optimizer == "megatron":
        if p.zero_stage >= 1:
            optimizer /= dp
    else:  # DeepSpeed ZeRO: stage 1 optimizer states, 2 + gradients, 3 + weights
        if p.zero_stage >= 1:
            optimizer /= dp
        if p.zero_stage >= 2:
            grads /= dp
        if p.zero_stage >= 3:
            weights /= dp
    return {"weights": weights, "grads": grads, "optimizer": optimizer}


# ------------------------------------------------------------------------------------------------ activations
@dataclass(frozen=True)
class ActivationTerm:
    """A tensor autograd keeps per layer: ``bytes_per_token`` on one TP rank, and what re-creates it.

    ``dropped_by``: the recompute modes under which this tensor is not kept (``full`` drops everything but the
    layer input, which is the term named ``attn_norm_in``).
    """
    name: str
    bytes_per_token: float
    dropped_by: frozenset[str] = frozenset()
    note: str = ""


def layer_activation_terms(cfg: Config, *, tp: int | None = None, sequence_parallel: bool | None = None,
                           seq_len: int | None = None, sparse: bool = True) -> list[ActivationTerm]:
    """The tensors one transformer layer keeps for its backward, per token, on one TP rank.

    Args:
        cfg: run config (model shape and variant, ``parallel.tp/sequence_parallel``, ``train.seq_len/dtype``).
        tp, sequence_parallel, seq_len: override the config's values.
        sparse: elas: the 2:4 phase (compressed ``s`` saved); False = dense warm-up / ``model.sparse24=false`` /
            ``sparse24_grad=dense`` (``relu(y1)`` saved dense).
    Returns:
        One :class:`ActivationTerm` per saved tensor; ``sum(t.bytes_per_token)`` is the no-recompute total.
    """
    m = cfg.model
    tp = cfg.parallel.tp if tp is None else tp
    sp = (cfg.parallel.sequence_parallel if sequence_parallel is None else sequence_parallel) and tp > 1
    s = cfg.train.seq_len if seq_len is None else seq_len
    e = activation_dtype_bytes(cfg)
    h = m.hidden_size
    hd = h // m.num_heads
    hq, hkv, heads = m.num_heads * hd, m.kv_heads * hd, m.num_heads
    seq_div = tp if sp else 1              # tensors outside the TP region: sharded along the sequence under SP
    variant = get_variant(m.variant)
    terms = _Terms(e=e, tp=tp, seq_div=seq_div, sparse=sparse, tokens=cfg.train.micro_batch * s,
                   silu=m.lowrank_activation == "silu")
    SEL = frozenset({"selective"})
    terms.add("attn_norm_in", e * h / seq_div, note="residual stream: input RMSNorm input")
    terms.add("attn_norm_rstd", 4 / seq_div, note="input RMSNorm 1/rms per token, fp32")
    terms.add("qkv_in", e * h / seq_div, note="input RMSNorm output, input of linear_qkv")

    # ---- attention
    lowrank_attention = variant.lowrank_attention(m)
    if lowrank_attention:
        terms.lowrank_column("qkv", h, 3, m.attn_rank)
    terms.add("qkv_out", e * (hq + 2 * hkv) / tp, note="fused q|k|v output (kept alive by v, a view of it)")
    terms.add("qk_rope", e * (hq + hkv) / tp, note="q, k after RoPE")
    if _attention_backend(m, cfg) == "sdpa":
        # NOTE: SDPA's output is laid out like q ([s, b, heads, d] in memory), so the context that linear_proj
        # saves is the same storage as the output SDPA saves: only the log-sum-exp is SDPA's own.
        terms.add("attn_lse", 4 * heads / tp, SEL, "SDPA log-sum-exp, fp32")
    else:
        probs = (4 + e) if e == 2 else 4     # fp32 softmax output + its bf16 copy for the PV product
        terms.add("attn_probs", probs * heads * s / tp, SEL, "softmax(QK^T), s x s per head")
    terms.add("proj_in", e * hq / tp, note="attention context, input of linear_proj")
    if lowrank_attention:
        terms.lowrank_row("proj", m.attn_rank)

    # ---- FFN: the norm is common, the rest is the variant's
    terms.add("mlp_norm_in", e * h / seq_div, note="pre-MLP RMSNorm input")
    terms.add("mlp_norm_rstd", 4 / seq_div, note="pre-MLP RMSNorm 1/rms per token, fp32")
    terms.add("fc1_in", e * h / seq_div, note="pre-MLP RMSNorm output, input of linear_fc1")
    variant.ffn_activation_terms(m, terms)
    return terms.terms


@dataclass
class _Terms:
    """Collects :class:`ActivationTerm` s (the ``ActivationTerms`` interface of :mod:`elas_megatron.variants`)."""
    e: int
    tp: int
    seq_div: int
    sparse: bool
    tokens: int
    silu: bool
    ffn: frozenset[str] = frozenset({"ffn"})
    terms: list[ActivationTerm] = field(default_factory=list)

    def add(self, name: str, bytes_per_token: float, dropped: frozenset[str] = frozenset(), note: str = "") -> None:
        self.terms.append(ActivationTerm(name, bytes_per_token, dropped, note))

    def lowrank_column(self, name: str, in_features: int, parts: int, r: int,
                       dropped: frozenset[str] = frozenset()) -> None:
        """sigma(x A) is computed on this rank's tokens (s / tp under SP), then gathered; B multiplies the gathered
        [tokens, parts * r] tensor on every rank. Several parts multiply x by their concatenated A factors
        ([in, parts * r], a new tensor saved once per micro-batch: spread over its tokens here)."""
        e = self.e
        if parts > 1:
            self.add(f"{name}_a_cat", e * in_features * parts * r / self.tokens, dropped,
                     "concatenated A factors (per micro-batch, not per token)")
        if self.silu:
            self.add(f"{name}_sigma_in", e * parts * r / self.seq_div, dropped, "x A (SiLU input)")
        self.add(f"{name}_b_in", e * parts * r, dropped, "sigma(x A), input of B")

    def lowrank_row(self, name: str, r: int, dropped: frozenset[str] = frozenset()) -> None:
        """The [tokens, r] sum is all-reduced (reduce-scattered under SP) before sigma and B."""
        if self.silu:
            self.add(f"{name}_sigma_in", self.e * r / self.seq_div, dropped, "sum_i x_i A_i (SiLU input)")
        self.add(f"{name}_b_in", self.e * r / self.seq_div, dropped, "sigma(z), input of B")


def layer_activation_bytes_per_token(terms: list[ActivationTerm], recompute: str) -> float:
    """Bytes per token one layer keeps between its forward and backward under ``recompute``."""
    if recompute == "full":
        return next(t.bytes_per_token for t in terms if t.name == "attn_norm_in")
    return sum(t.bytes_per_token for t in terms if recompute not in t.dropped_by)


def recompute_working_bytes_per_token(terms: list[ActivationTerm], recompute: str) -> float:
    """What one layer re-creates during its backward (held for one layer and one micro-batch at a time)."""
    return sum(t.bytes_per_token for t in terms) - layer_activation_bytes_per_token(terms, recompute)


def in_flight_chunks(pp: int, vpp: int | None, stage: int, num_microbatches: int) -> int:
    """Micro-batch x model-chunk forward passes whose activations a stage holds at its peak.

    No pipelining: 1. 1F1B: ``min(pp - stage, m)`` micro-batches. Interleaved (``vpp`` chunks per stage):
    megatron's warm-up ``2 (pp - stage - 1) + (vpp - 1) pp`` plus one, capped by ``m * vpp`` chunk passes.
    """
    if pp == 1:
        return 1
    if vpp is None or vpp == 1:
        return min(pp - stage, num_microbatches)
    return min(2 * (pp - stage - 1) + (vpp - 1) * pp + 1, num_microbatches * vpp)


# --------------------------------------------------------------------------------------------------- estimate
@dataclass
class StageMemory:
    """Bytes on one GPU of one pipeline stage."""
    stage: int
    layers: int
    params: int
    weights: float
    grads: float
    optimizer: float
    activations: float
    """Under the config's ``parallel.recompute`` (the peak incl. recompute working set and logits)."""
    activations_by_recompute: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations


@dataclass
class MemoryEstimate:
    """Per-GPU memory of every pipeline stage; :attr:`peak` is the stage that needs the most."""
    stages: list[StageMemory]
    dp: int
    num_microbatches: int
    tokens_per_microbatch: int
    bytes_per_param: dict[str, float]
    dense_warmup: bool
    """True when the peak is the elas dense warm-up (relu(y1) saved dense before the 2:4 phase starts)."""

    @property
    def peak(self) -> StageMemory:
        return max(self.stages, key=lambda st: st.total)


def estimate_memory(cfg: Config, *, world_size: int, vocab_size: int) -> MemoryEstimate:
    """Per-GPU memory estimate of ``cfg`` on ``world_size`` GPUs (formulas: module docstring, docs/launch.md)."""
    p, t, m = cfg.parallel, cfg.train, cfg.model
    dp = world_size // (p.tp * p.pp)
    num_microbatches = t.global_batch // (t.micro_batch * dp)
    tokens = t.micro_batch * t.seq_len
    e = activation_dtype_bytes(cfg)
    sp = p.sequence_parallel and p.tp > 1
    per_param = state_bytes_per_param(cfg, dp)
    # elas: a dense warm-up (or a dense-saving mode) keeps relu(y1) dense; the allocator keeps that peak.
    dense_phase = get_variant(m.variant).dense_phase(m)
    terms = layer_activation_terms(cfg, sparse=not dense_phase)
    layers = stage_layers(cfg)
    params = parameters_per_gpu(cfg, vocab_size)
    stages = []
    for s, (n_layers, n_params) in enumerate(zip(layers, params, strict=True)):
        chunks = in_flight_chunks(p.pp, p.vpp, s, num_microbatches)
        layers_per_chunk = n_layers / (p.vpp or 1)
        by_mode = {}
        for mode in RECOMPUTE_MODES:
            kept = layer_activation_bytes_per_token(terms, mode) * layers_per_chunk * chunks
            working = recompute_working_bytes_per_token(terms, mode) if n_layers else 0.0
            by_mode[mode] = (kept + working) * tokens
        if s == len(layers) - 1:  # final norm in/out, fp32 logits of the cross-entropy, then their gradient
            logits = (2 * e * m.hidden_size / (p.tp if sp else 1) + (4 + e) * vocab_size / p.tp) * tokens
            by_mode = {k: v + logits for k, v in by_mode.items()}
        stages.append(StageMemory(stage=s, layers=n_layers, params=n_params,
                                  weights=n_params * per_param["weights"], grads=n_params * per_param["grads"],
                                  optimizer=n_params * per_param["optimizer"], activations=by_mode[p.recompute],
                                  activations_by_recompute=by_mode))
    return MemoryEstimate(stages=stages, dp=dp, num_microbatches=num_microbatches, tokens_per_microbatch=tokens,
                          bytes_per_param=per_param, dense_warmup=dense_phase)


# ------------------------------------------------------------------------------------------- available memory
def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def host_memory_available() -> tuple[int, str]:
    """(bytes, where from) of RAM this process may still take: ``MemAvailable`` of ``/proc/meminfo``, or less when
    a cgroup limit (v2 ``memory.max``, v1 ``memory.limit_in_bytes``) leaves less."""
    available, source = None, "MemAvailable"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    for limit_path, usage_path in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_path), _read_int(usage_path)
        if limit is not None and usage is not None and limit < 2**60:  # "max" / the v1 "unlimited" value
            if available is None or limit - usage < available:
                available, source = max(0, limit - usage), f"cgroup limit {limit / GIB:.1f} GiB"
            break
    if available is None:
        return 0, "unknown"
    return available, source


def available_memory(device_type: str, device_index: int | None = None, local_processes: int = 1) -> tuple[int, str]:
    """(bytes, description) this process may allocate for training: on ``cuda`` the device's free memory
    (``torch.cuda.mem_get_info``, after the context was created); on ``cpu`` :func:`host_memory_available`
    divided by the training processes of this host (``local_processes``). 0 bytes: unknown (no check)."""
    if device_type == "cuda":
        import torch

        free, total = torch.cuda.mem_get_info(device_index)
        return free, f"free on GPU {device_index} ({total / GIB:.1f} GiB total)"
    available, source = host_memory_available()
    if local_processes > 1:
        return available // local_processes, (f"host RAM ({source}) {available / GIB:.1f} GiB shared by "
                                               f"{local_processes} processes on this host")
    return available, f"host RAM ({source})"
