"""What training loads: sentencepiece tokenizers, Megatron indexed datasets and the run's datasets.

Preparing data (reading corpora, tokenizing them, training a tokenizer, the demo corpus) is the tool
:mod:`elas_megatron.prep` (``elas-prep``); it writes what this package reads.

Modules (imported individually, so that ``elas-prep`` workers never pay for importing Megatron-Core):

* :mod:`~elas_megatron.data.tokenizer` -- ``load_tokenizer`` (sentencepiece).
* :mod:`~elas_megatron.data.indexed` -- atomic writing, checking and merging of Megatron indexed datasets.
* :mod:`~elas_megatron.data.datasets` -- ``build_datasets``: Megatron ``GPTDataset``s for the trainer.
* :mod:`~elas_megatron.data.helpers` -- Megatron's C++ index helpers, compiled when an install lacks them.
* :mod:`~elas_megatron.data.loader` -- ``StepBatches``: a step's micro-batches for this data-parallel rank.
* :mod:`~elas_megatron.data.synthetic` -- synthetic token samples (tests, benchmarks).
"""
