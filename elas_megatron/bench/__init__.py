# SPDX-License-Identifier: Apache-2.0
"""Model-level benchmarks behind ``elas-bench`` (issue 7): training/prefill throughput and quality runs.

* :mod:`~elas_megatron.bench.throughput`: warm-up + timed training steps (or forward-only prefill) of dense,
  cola and elas over micro-batch sizes and sequence lengths, one subprocess per configuration by default;
  tokens/s, MFU, peak and activation memory, a per-module time split, the largest batch that fits.
* :mod:`~elas_megatron.bench.timing`: device-timeline clocks and the module timer behind the time split.
* :mod:`~elas_megatron.bench.quality`: same data/seed/tokens training runs of several variants through
  ``elas_megatron.cli.train``, validation-perplexity curves and the final table.
* :mod:`~elas_megatron.bench.report`: results.json / results.csv, Markdown tables and the PNG plots.
* :mod:`~elas_megatron.bench.corpus`: the license-clean English corpus of the quality runs (CPython docs).

The kernel-level benchmarks stay in ``benchmarks/`` (``bench_elas_ffn.py``); these measure whole models.
"""
