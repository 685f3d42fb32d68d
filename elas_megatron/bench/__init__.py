# SPDX-License-Identifier: Apache-2.0
"""The benchmarks behind ``elas-bench``: training/prefill throughput and quality runs of whole models, and the
FFN on its own.

* :mod:`~elas_megatron.bench.throughput`: warm-up + timed training steps (or forward-only prefill) of dense,
  cola and elas over micro-batch sizes and sequence lengths, one subprocess per configuration by default;
  tokens/s, MFU, peak and activation memory, a per-module time split, the largest batch that fits.
* :mod:`~elas_megatron.bench.timing`: device-timeline clocks and the module timer behind the time split.
* :mod:`~elas_megatron.bench.quality`: same data/seed/tokens training runs of several variants through
  ``elas_megatron.cli.train``, validation-perplexity curves and the final table.
* :mod:`~elas_megatron.bench.report`: results.json / results.csv, Markdown tables and the PNG plots.
* :mod:`~elas_megatron.bench.corpus`: the license-clean English corpus of the quality runs (CPython docs).

* :mod:`~elas_megatron.bench.ffn`: the FFN variants alone (time, saved and peak memory, elas's speed-up next to
  its 2:4 ceiling, agreement with the reference), and :mod:`~elas_megatron.bench.ffn_pieces`: the elas core's
  kernels and GEMMs alone (``elas-bench ffn --pieces``).
"""
