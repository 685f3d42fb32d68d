"""Data preparation (``elas-prep``): a tool above the library, which it never imports.

* :mod:`~elas_megatron.prep.sources` -- C4 / JSON-lines / saved-dataset inputs, read in blocks of lines.
* :mod:`~elas_megatron.prep.pipeline` -- ``tokenize_corpus``: one ``.bin``/``.idx`` per shard, multi-process, resumable.
* :mod:`~elas_megatron.prep.tokenizer_training` -- ``train_tokenizer``: a LLaMA-style sentencepiece model.
* :mod:`~elas_megatron.prep.demo` -- the shipped demo corpus (CPython documentation in C4's format).
"""
