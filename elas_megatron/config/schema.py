"""The one typed configuration tree of elas-megatron.

Every run is described by a :class:`Config`; YAML files under ``configs/`` and ``section.key=value``
overrides are parsed into it by :mod:`elas_megatron.config.loader`. Fields carry their documentation as
the string literal right under them. Single-field range checks live in ``__post_init__``; rules that tie
several sections together live in :func:`validate`. Errors name the config path, the value received and
the fix, because a typo in a 64-node job should cost seconds, not a queue slot.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Literal

from elas_megatron.utils.errors import ConfigError
from elas_megatron.variants.registry import UnknownVariantError, get_variant

Variant = str
"""A name registered in :mod:`elas_megatron.variants` (built in: dense, cola, elas)."""
KernelBackend = Literal["auto", "reference", "triton", "cusparselt"]


def _check(cond: bool, key: str, value: object, expected: str) -> None:
    if not cond:
        raise ConfigError(f"{key}={value!r} is invalid: expected {expected}")


def _check_finite(section: object, name: str) -> None:
    """Every float field of a section is a finite number (YAML accepts .inf and .nan)."""
    for f in fields(section):
        value = getattr(section, f.name)
        if isinstance(value, float):
            _check(math.isfinite(value), f"{name}.{f.name}", value, "a finite number")


@dataclass(kw_only=True)
class ModelConfig:
    variant: Variant = "elas"
    """A registered variant (elas_megatron.variants). dense: full-rank LLaMA (SwiGLU FFN); cola: every linear is
    sigma(x A) B (arXiv 2502.10940); elas: cola with the non-gated squared-ReLU FFN whose activations are 2:4
    sparse (arXiv 2605.03667)."""
    hidden_size: int = 512
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int | None = None
    """Grouped-query attention: number of key/value heads (None = num_heads, i.e. multi-head attention)."""
    ffn_hidden_size: int = 1376
    """d_ff. For elas it must be a multiple of 4 * parallel.tp, so that 2:4 groups never straddle a TP shard."""
    rank: int = 128
    """Low-rank factor width r of cola/elas linear layers (A: [in, r], B: [r, out])."""
    attention_rank: int | None = None
    """Rank of the attention projections (None = model.rank)."""
    lowrank_attention: bool = True
    """cola/elas: make q, k, v, o low-rank too. False keeps attention full-rank."""
    lowrank_activation: Literal["silu", "identity"] = "silu"
    """sigma in sigma(x A) B: silu is CoLA's default; identity gives plain low-rank factorisation."""
    sparse24: bool = True
    """elas: apply the 2:4 activation sparsity. False computes the same network dense (ablation baseline)."""
    sparse24_grad: Literal["masked", "dense"] = "masked"
    """elas backward through sparse24: masked = straight-through to the kept entries only (the exact gradient
    of the sparsified function); dense = the masked-dense alternative, the gradient of y2 passes to all entries."""
    dense_warmup_steps: int = 0
    """elas: train this many first steps without sparsification (the same network computed dense). Ignored by
    dense/cola, so one config can switch variants."""
    vocab_size: int | None = None
    """None = taken from the tokenizer. Set it to pad the vocabulary (e.g. to a multiple of 128)."""
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    """Std of the full-rank weights (embeddings, dense linears). Low-rank factors use CoLA's init."""
    spec: Literal["local", "te"] = "local"
    """Megatron-Core layer spec: local (pure PyTorch, runs on CPU) or te (Transformer Engine, GPU only)."""
    attention_backend: Literal["auto", "local", "sdpa"] = "auto"
    """Core attention: megatron-core's unfused local attention, or torch SDPA (flash/cuDNN kernels).
    auto = sdpa on CUDA, local on CPU."""
    rope_backend: Literal["auto", "megatron", "triton"] = "auto"
    """How q and k get their rotary embedding: megatron's unfused PyTorch ops, or one Triton pass each
    (elas_megatron.kernels.rope). auto = triton on CUDA with the local spec and Triton installed, else megatron
    (the TE spec uses TE's fused RoPE)."""
    lowrank_parts: Literal["separate", "fused"] = "separate"
    """cola/elas projections with several low-rank parts (attention's q, k, v; cola's SwiGLU gate, up):
    separate = each part's B product writes its own tensor, which attention / the SwiGLU (Liger-Kernel's fused
    kernel on CUDA when installed) read as they are; fused = the parts are concatenated into megatron's fused
    layout first and split again (the plain path: the same values, plus a copy of every [tokens, parts x width]
    tensor in the forward and in the backward)."""
    loss_backend: Literal["auto", "megatron", "liger"] = "auto"
    """Output layer + cross-entropy: megatron = the logits GEMM, then megatron's vocab-parallel cross-entropy on
    fp32 logits ([tokens, vocab] in fp32 and bf16 in memory); liger = Liger-Kernel's fused linear cross-entropy
    (the logits are computed in chunks and never held whole; needs the `liger-kernel` package and a CUDA device).
    auto = liger where it can run (CUDA, liger-kernel installed, parallel.tp=1), else megatron."""
    kernel_backend: KernelBackend = "auto"
    """elas: how the 2:4-sparse FFN core runs (elas_megatron.kernels.dispatch): reference = plain PyTorch (any
    device); triton = fused Triton kernels, dense tensor-core math (CUDA); cusparselt = as triton with the forward
    GEMM on the 2:4 sparse tensor cores (CUDA sm80+, 16-bit); auto = the fastest of the GPU paths, timed once per
    shape, on CUDA, else reference. An explicit backend that cannot run fails when the FFN first runs."""

    def __post_init__(self) -> None:
        try:
            get_variant(self.variant)
        except UnknownVariantError as exc:
            raise ConfigError(str(exc)) from None
        _check_finite(self, "model")
        for key in ("hidden_size", "num_layers", "num_heads", "ffn_hidden_size", "rank"):
            value = getattr(self, key)
            _check(value >= 1, f"model.{key}", value, "a positive integer")
        _check(self.hidden_size % self.num_heads == 0, "model.hidden_size", self.hidden_size,
               f"a multiple of model.num_heads={self.num_heads}")
        if self.num_kv_heads is not None:
            _check(self.num_kv_heads >= 1 and self.num_heads % self.num_kv_heads == 0, "model.num_kv_heads",
                   self.num_kv_heads, f"a divisor of model.num_heads={self.num_heads}")
        if self.attention_rank is not None:
            _check(self.attention_rank >= 1, "model.attention_rank", self.attention_rank, "a positive integer")
        _check(self.dense_warmup_steps >= 0, "model.dense_warmup_steps", self.dense_warmup_steps, ">= 0")
        if self.vocab_size is not None:
            _check(self.vocab_size >= 2, "model.vocab_size", self.vocab_size, ">= 2 or null")
        _check(self.init_std > 0, "model.init_std", self.init_std, "> 0")
        _check(self.norm_eps > 0, "model.norm_eps", self.norm_eps, "> 0")
        _check(self.rope_base > 0, "model.rope_base", self.rope_base, "> 0")

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def attn_rank(self) -> int:
        return self.attention_rank or self.rank


@dataclass(kw_only=True)
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
    vpp: int | None = None
    """Virtual pipeline stages per rank (interleaved 1F1B); None = plain 1F1B."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs tp > 1)."""
    first_stage_layers: int | None = None
    """Transformer layers on the first pipeline stage (None = even split)."""
    last_stage_layers: int | None = None
    """Transformer layers on the last pipeline stage (None = even split)."""
    optimizer: Literal["megatron", "deepspeed"] = "megatron"
    """Data-parallel optimizer backend: Megatron-Core DDP + (distributed) optimizer, or DeepSpeed ZeRO."""
    zero_stage: int = 0
    """0 = replicated optimizer state. megatron: >= 1 uses the distributed optimizer (states and grads sharded).
    deepspeed: the ZeRO stage, 1 or 2 (1 with pipeline parallelism)."""
    recompute: Literal["none", "full", "selective", "ffn"] = "none"
    """Activation checkpointing: none; full = whole transformer layers; selective = megatron's core-attention
    recompute; ffn = only the FFN (the largest activations of cola/elas)."""
    distributed_timeout_s: int = 600
    """The limit for training steps: the watchdog stops the run naming the stuck rank(s) when a rank makes no
    progress this long in a step, and collectives in steps time out just after it (docs/reliability.md)."""
    io_timeout_s: int = 3600
    """The limit for checkpoint saves: a rank that stays this long in one is a hang (their collectives wait as
    long). Start-up phases (waiting for every rank to start, under torchrun; run directory, model build, dataset
    index build, checkpoint load) and their collectives are timed with this or ``distributed_timeout_s``, whichever
    is longer, so that neither, set short to catch a stall quickly, fails a slow start."""
    straggler_check_every: int = 50
    """Multi-process runs: every N steps the ranks compare their compute time per step (one all_gather of a
    float); rank 0 logs a warning naming the slowest rank(s) when one is > 1.2x the median. 0 = off."""

    def __post_init__(self) -> None:
        for key in ("tp", "pp"):
            _check(getattr(self, key) >= 1, f"parallel.{key}", getattr(self, key), "a positive integer")
        if self.vpp is not None:
            _check(self.vpp >= 1, "parallel.vpp", self.vpp, "a positive integer or null")
        for key in ("first_stage_layers", "last_stage_layers"):
            value = getattr(self, key)
            if value is not None:
                _check(value >= 1, f"parallel.{key}", value, "a positive integer or null")
                _check(self.pp > 1, f"parallel.{key}", value, "null when parallel.pp=1")
        _check(0 <= self.zero_stage <= 3, "parallel.zero_stage", self.zero_stage, "0, 1, 2 or 3")
        _check(not self.sequence_parallel or self.tp > 1, "parallel.sequence_parallel", self.sequence_parallel,
               "false when parallel.tp=1 (sequence parallelism shards along the TP group)")
        _check(self.distributed_timeout_s > 0, "parallel.distributed_timeout_s", self.distributed_timeout_s, "> 0")
        _check(self.io_timeout_s > 0, "parallel.io_timeout_s", self.io_timeout_s, "> 0")
        _check(self.straggler_check_every >= 0, "parallel.straggler_check_every", self.straggler_check_every, ">= 0")


def start_up_limit(distributed_timeout_s: float, io_timeout_s: float) -> tuple[float, str]:
    """(seconds, config key) of the start-up limit: the longer of the two (``io_timeout_s`` on a tie).

    Why the longer: start-up is neither a collective step nor only I/O. Ranks start at different times and import
    and build at the speed of a possibly busy node, so neither a short collective timeout nor a short I/O limit
    (chosen to catch a stalled save quickly) may fail it. Ranks also wait for each other to start this long
    (:mod:`elas_megatron.parallel.setup`), and the watchdog times start-up phases with it
    (:mod:`elas_megatron.training.watchdog`).
    """
    if distributed_timeout_s > io_timeout_s:
        return distributed_timeout_s, "parallel.distributed_timeout_s"
    return io_timeout_s, "parallel.io_timeout_s"


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    """Cosine decay floor, as a fraction of optim.lr."""
    warmup_steps: int | None = None
    """Linear warm-up steps; None = optim.warmup_fraction * train.steps."""
    warmup_fraction: float = 0.1
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0
    """Global grad-norm clip (0 disables)."""
    adam_impl: Literal["auto", "foreach", "fused"] = "auto"
    """torch AdamW kernel (used without Apex/TE, i.e. megatron's fallback and the DeepSpeed backend): foreach
    (several multi-tensor passes) or fused (one pass, CUDA only). auto = fused on CUDA, foreach elsewhere."""
    multi_tensor_impl: Literal["foreach", "megatron"] = "foreach"
    """Without Apex/TE, megatron-core copies between bf16 weights and fp32 master weights and computes the grad
    norm with per-tensor Python loops (one host sync per parameter tensor for the norm). foreach = the same
    operations with torch's multi-tensor kernels (elas_megatron.compat.multi_tensor); megatron = its fallback."""

    def __post_init__(self) -> None:
        _check_finite(self, "optim")
        _check(self.lr > 0, "optim.lr", self.lr, "> 0")
        _check(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", self.min_lr_ratio, "in [0, 1]")
        _check(0 <= self.warmup_fraction < 1, "optim.warmup_fraction", self.warmup_fraction, "in [0, 1)")
        if self.warmup_steps is not None:
            _check(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, ">= 0")
        _check(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, ">= 0")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "optim.beta1/beta2", (self.beta1, self.beta2),
               "values in [0, 1)")
        _check(self.clip_grad >= 0, "optim.clip_grad", self.clip_grad, ">= 0 (0 disables clipping)")
        _check(self.eps > 0, "optim.eps", self.eps, "> 0")


@dataclass(kw_only=True)
class DataConfig:
    tokenizer: str = "data/demo/tokenizer.model"
    """Sentencepiece model file (relative paths resolve against the current directory)."""
    train_prefixes: list[str] = field(default_factory=lambda: ["data/demo/tokens/demo_text_document"])
    """Megatron indexed-dataset prefixes (path without .bin/.idx). Several prefixes are blended."""
    train_weights: list[float] | None = None
    """Blend weights of train_prefixes (None = proportional to size)."""
    valid_prefixes: list[str] | None = None
    """Separate validation prefixes (e.g. C4's validation shards); None = carve valid out of train by data.split."""
    split: str = "98,2,0"
    """train,valid,test split of train_prefixes when valid_prefixes is None."""
    cache_dir: str | None = None
    """Where GPTDataset caches its index files (None = next to the run directory)."""

    def __post_init__(self) -> None:
        _check(len(self.train_prefixes) >= 1, "data.train_prefixes", self.train_prefixes, "at least one prefix")
        if self.train_weights is not None:
            _check(len(self.train_weights) == len(self.train_prefixes) and all(w > 0 for w in self.train_weights),
                   "data.train_weights", self.train_weights, "one positive weight per data.train_prefixes entry")
        parts = self.split.split(",")
        ok = len(parts) == 3 and all(p.strip().replace(".", "", 1).isdigit() for p in parts)
        _check(ok and sum(float(p) for p in parts) > 0, "data.split", self.split,
               "three comma-separated non-negative numbers, not all 0, e.g. '98,2,0'")


@dataclass(kw_only=True)
class TrainConfig:
    steps: int = 1000
    global_batch: int = 64
    """Sequences per optimizer step, over all data-parallel ranks and micro-batches."""
    micro_batch: int = 8
    """Sequences per forward/backward on one data-parallel rank."""
    seq_len: int = 256
    seed: int = 1234
    run_dir: str = "runs/default"
    """metrics.jsonl, the resolved config and checkpoints/ go here. One job per run directory: rank 0 holds an
    exclusive lock on {run_dir}/.lock while the job runs (docs/reliability.md)."""
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """auto = bf16 on CUDA, fp32 on CPU."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    eval_every: int = 0
    """Validation perplexity every N steps (0 = only at the end)."""
    eval_iters: int = 10
    """Validation micro-batches per evaluation."""
    max_skipped_steps: int = 0
    """Optimizer steps the run may skip (over its whole length, resumes included) because the loss or a gradient
    was NaN/Inf on some rank, or the loss spiked (train.loss_spike_factor); a skipped step drops its batch and
    leaves weights, optimizer and LR schedule untouched. One more stops the run naming the step, rank and layer.
    0 = stop at the first."""
    loss_spike_factor: float = 0.0
    """Loss-spike guard: a step whose loss exceeds this factor times the running mean of the previous losses is
    treated like a non-finite one (skipped within train.max_skipped_steps, else the run stops). 0 = off; e.g. 2."""
    density_check_every: int = 100
    """elas: every N steps measure the FFN activation density after 2:4 sparsification (logged as
    sparsity/act_density; one extra pass and a host sync per ElasMLP in that step). Above 0.5 logs an error (the
    2:4 invariant is broken); below train.density_warn warns. 0 = off."""
    density_warn: float = 0.2
    """elas: warn when the measured activation density drops below this (many all-zero groups: dying ReLU units;
    about 0.4 is typical, 0.5 is the 2:4 maximum)."""
    check_memory: bool = True
    """Before the model is built, refuse a run whose memory estimate (the dry run's: weights, gradients, optimizer
    states, activations) exceeds the memory available to this process -- the GPU's free memory, or on CPU the
    host's available RAM (and cgroup limit) shared by the processes of this host. false = start anyway (the
    estimate leaves out allocator overhead, so it does not refuse runs that merely come close)."""

    def __post_init__(self) -> None:
        _check_finite(self, "train")
        for key in ("steps", "global_batch", "micro_batch", "seq_len", "eval_iters"):
            _check(getattr(self, key) >= 1, f"train.{key}", getattr(self, key), "a positive integer")
        _check(self.eval_every >= 0, "train.eval_every", self.eval_every, ">= 0")
        _check(0 <= self.seed < 2**32, "train.seed", self.seed, "in [0, 2**32) (numpy seeds the data order)")
        _check(self.max_skipped_steps >= 0, "train.max_skipped_steps", self.max_skipped_steps, ">= 0")
        _check(self.loss_spike_factor == 0 or self.loss_spike_factor > 1, "train.loss_spike_factor",
               self.loss_spike_factor, "0 (off) or a factor > 1, e.g. 2")
        _check(self.density_check_every >= 0, "train.density_check_every", self.density_check_every, ">= 0")
        _check(0 <= self.density_warn <= 0.5, "train.density_warn", self.density_warn, "in [0, 0.5]")
        _check(bool(self.run_dir.strip()), "train.run_dir", self.run_dir,
               "a directory path (an empty one would write checkpoints and metrics into the current directory)")


@dataclass(kw_only=True)
class CheckpointConfig:
    every: int = 0
    """Save every N steps (0 = only at the end)."""
    keep_last: int = 3
    """Keep the newest K step checkpoints (0 = keep all)."""
    dir: str | None = None
    """None = {train.run_dir}/checkpoints."""
    save_final: bool = True
    """Save a checkpoint at the end of training (after the last step)."""
    async_save: bool = False
    """Write checkpoint files in background processes while training goes on (megatron dist_checkpointing's
    async save, from a snapshot taken when the save starts); the checkpoint becomes `latest` only once every rank
    has finished writing it. The next save, the end of training and a preemption stop wait for it. Not with
    parallel.optimizer=deepspeed."""
    fallback_to_verified: bool = False
    """--resume from the newest checkpoint that passes verification (manifest sha256/sizes, nothing pickled that
    could run code) instead of refusing when `latest` fails it; every skipped checkpoint is logged with the file
    and the reason. Off: a checkpoint that fails verification stops the run (docs/reliability.md)."""

    def __post_init__(self) -> None:
        _check(self.every >= 0, "checkpoint.every", self.every, ">= 0")
        _check(self.keep_last >= 0, "checkpoint.keep_last", self.keep_last, ">= 0")


@dataclass(kw_only=True)
class LogConfig:
    every: int = 1
    """Console/JSONL log interval in steps."""
    level: Literal["debug", "info", "warning"] = "info"
    """Console log level."""
    tensorboard: bool = False
    """Also write every metrics.jsonl record as TensorBoard scalars to {train.run_dir}/tensorboard (logging rank
    only; slash-namespaced tags such as loss/train, perf/tokens_per_s, optim/lr); open them with tensorboard --logdir
    {train.run_dir}/tensorboard. The tensorboard package is a dependency of elas-megatron. A resumed run continues the
    same TensorBoard run: the steps after the checkpoint are replaced, not duplicated. configs/demo.yaml turns it on."""
    wandb_project: str | None = None
    """Also send every metrics.jsonl record to Weights & Biases, to this project (logging rank only; the same
    slash-namespaced names and values as log.tensorboard; files in {train.run_dir}/wandb). Needs the optional extra:
    pip install 'elas-megatron[wandb]'. The run id is kept in {train.run_dir}/wandb_run.json, so --resume continues the
    same W&B run; W&B holds each step once (docs/monitoring.md). None = off."""
    wandb_entity: str | None = None
    """W&B entity (user or team) of log.wandb_project. None = the API key's default entity."""
    wandb_mode: Literal["auto", "online", "offline"] = "auto"
    """online: stream to the W&B server; offline: write the run to {train.run_dir}/wandb only (upload it later with
    wandb sync); auto: online when an API key (WANDB_API_KEY or ~/.netrc) and the server are reachable, else offline
    (one log line says why). An environment WANDB_MODE is honoured by auto."""
    profile_steps: list[int] = field(default_factory=list)
    """[from, to]: record a torch.profiler trace of training steps from..to (inclusive, 1-based) on every rank, written
    as Chrome/Perfetto JSON to {train.run_dir}/profile/trace_rank{R}_steps{from}-{to}.json (open it in
    https://ui.perfetto.dev or chrome://tracing). In those steps each transformer layer's forward and backward is a
    named range (layer N forward / layer N backward), also as NVTX ranges on GPU (Nsight Systems). Empty = off."""
    memory_snapshot_step: int | None = None
    """CUDA: record the allocator's history during this training step (1-based) and dump a memory snapshot per rank to
    {train.run_dir}/profile/memory_snapshot_rank{R}_step{S}.pickle (open it in https://pytorch.org/memory_viz).
    Skipped with a log line on CPU. None = off."""

    def __post_init__(self) -> None:
        _check(self.every >= 1, "log.every", self.every, "a positive integer")
        ps = self.profile_steps
        _check(ps == [] or (len(ps) == 2 and 1 <= ps[0] <= ps[1]), "log.profile_steps", ps,
               "[] (off) or [from, to] with 1 <= from <= to")
        _check(self.memory_snapshot_step is None or self.memory_snapshot_step >= 1, "log.memory_snapshot_step",
               self.memory_snapshot_step, "null (off) or a step >= 1")
        _check(self.wandb_project is None or self.wandb_project.strip() != "", "log.wandb_project",
               self.wandb_project, "null (off) or a W&B project name")


@dataclass(kw_only=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Cross-section rules. ``world_size`` (when known) checks the parallel layout against it."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    _check(m.num_heads % p.tp == 0, "model.num_heads", m.num_heads, f"divisible by parallel.tp={p.tp}")
    _check(m.kv_heads % p.tp == 0, "model.num_kv_heads", m.kv_heads, f"divisible by parallel.tp={p.tp}")
    get_variant(m.variant).validate(m, p)
    layers_per_chunk = p.pp * (p.vpp or 1)
    if p.first_stage_layers is None and p.last_stage_layers is None:
        _check(m.num_layers % layers_per_chunk == 0, "model.num_layers", m.num_layers,
               f"divisible by parallel.pp * parallel.vpp = {layers_per_chunk} (or set parallel.first_stage_layers/"
               "last_stage_layers)")
    else:
        fixed = [v for v in (p.first_stage_layers, p.last_stage_layers) if v is not None]
        middle_stages, middle_layers = p.pp - len(fixed), m.num_layers - sum(fixed)
        ok = (middle_layers == 0 if middle_stages == 0 else
              middle_layers >= middle_stages and middle_layers % middle_stages == 0)
        _check(ok, "model.num_layers", m.num_layers,
               f"the first/last stage layers ({p.first_stage_layers}/{p.last_stage_layers}) plus a multiple of the "
               f"{middle_stages} other pipeline stage(s), at least one layer each")
    if p.vpp is not None:
        _check(p.pp > 1, "parallel.vpp", p.vpp, "null when parallel.pp=1 (virtual stages need a pipeline)")
    _check(t.global_batch % t.micro_batch == 0, "train.global_batch", t.global_batch,
           f"a multiple of train.micro_batch={t.micro_batch}")
    if p.optimizer == "deepspeed":
        if p.zero_stage not in (1, 2):
            raise ConfigError(f"parallel.zero_stage={p.zero_stage} is invalid with parallel.optimizer=deepspeed: "
                              "expected 1 or 2 (ZeRO-3 partitions the weights, which megatron's TP layers and "
                              "schedules own; for replicated optimizer states use parallel.optimizer=megatron)")
        _check(p.pp == 1 or p.zero_stage <= 1, "parallel.zero_stage", p.zero_stage,
               "0 or 1 with pipeline parallelism (ZeRO-2/3 partition gradients, which the pipeline schedule owns)")
        if cfg.checkpoint.async_save:
            raise ConfigError("checkpoint.async_save=true is not supported with parallel.optimizer=deepspeed "
                              "(DeepSpeed writes its ZeRO optimizer partitions itself, synchronously); set "
                              "checkpoint.async_save=false or use parallel.optimizer=megatron")
    if world_size is not None:
        model_parallel = p.tp * p.pp
        if world_size % model_parallel != 0:
            raise ConfigError(f"world size {world_size} is not divisible by parallel.tp * parallel.pp = "
                              f"{model_parallel}; launch a multiple of {model_parallel} processes or change the layout")
        dp = world_size // model_parallel
        if t.global_batch % (t.micro_batch * dp) != 0:
            raise ConfigError(f"train.global_batch={t.global_batch} is not divisible by train.micro_batch * "
                              f"data-parallel size = {t.micro_batch} * {dp}; change one of them")
