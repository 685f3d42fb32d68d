"""Training data: corpus reading, sentencepiece tokenizers, Megatron indexed datasets and the run's datasets.

Modules (imported individually, so that ``elas-prep`` workers never pay for importing Megatron-Core):

* :mod:`~elas_megatron.data.tokenizer` -- ``load_tokenizer`` / ``train_tokenizer`` (sentencepiece).
* :mod:`~elas_megatron.data.sources` -- C4 / JSON-lines / saved-dataset inputs, read in blocks of lines.
* :mod:`~elas_megatron.data.pipeline` -- ``tokenize_corpus``: one ``.bin``/``.idx`` per shard, multi-process, resumable.
* :mod:`~elas_megatron.data.indexed` -- atomic writing, checking and merging of Megatron indexed datasets.
* :mod:`~elas_megatron.data.datasets` -- ``build_datasets``: Megatron ``GPTDataset``s for the trainer.
* :mod:`~elas_megatron.data.helpers` -- Megatron's C++ index helpers, compiled when an install lacks them.
* :mod:`~elas_megatron.data.demo` -- the shipped demo corpus (CPython documentation in C4's format).
"""
