"""Data vs tokenizer vocabulary: refuse data tokenized with another vocabulary than ``data.tokenizer``'s.

``elas-prep`` records the tokenizer it used in every prefix's ``.meta.json`` sidecar (path, SHA-256, vocabulary
size, EOS id). Token ids of a different vocabulary mean different pieces, so such data is refused -- at the dry run
(``elas_megatron.cli.dryrun.check_data``) and at start (``elas_megatron.data.datasets.build_datasets``). Data without
a sidecar (made by another tool) is only checked for token ids that do not fit the model's vocabulary. The same
vocabulary size with a different tokenizer file is a warning (a retrained tokenizer of the same size), not an error.
Imports neither torch nor megatron.
"""
from __future__ import annotations

import os

from elas_megatron.config.schema import DataConfig
from elas_megatron.data.indexed import META_SUFFIX, read_meta

__all__ = ["check_data_vocabulary", "vocabulary_mismatch"]


def vocabulary_mismatch(prefix: str, what: str, meta: dict | None, tokenizer_path: str,
                        tokenizer_vocab: int) -> str | None:
    """One line when ``meta`` (the prefix's sidecar) records another vocabulary size than the tokenizer's."""
    meta_vocab = (meta or {}).get("vocab_size")
    if not isinstance(meta_vocab, int) or meta_vocab == tokenizer_vocab:
        return None
    return (f"{what}: {prefix}{META_SUFFIX} records a {meta_vocab}-piece tokenizer ({meta.get('tokenizer')}) but "
            f"data.tokenizer={tokenizer_path} has {tokenizer_vocab} pieces; re-tokenize the data with "
            f"data.tokenizer (elas-prep tokenize, docs/data.md) or set data.tokenizer to the tokenizer it was made "
            "with")


def check_data_vocabulary(data_cfg: DataConfig) -> list[str]:
    """One line per prefix whose sidecar records another vocabulary size than ``data.tokenizer``'s.

    Nothing to check (empty list) when the tokenizer file is absent or a prefix has no sidecar.
    """
    if not os.path.isfile(data_cfg.tokenizer):
        return []
    from elas_megatron.data.tokenizer import load_tokenizer

    vocab = load_tokenizer(data_cfg.tokenizer).vocab_size
    prefixes = [("data.train_prefixes", p) for p in data_cfg.train_prefixes]
    prefixes += [("data.valid_prefixes", p) for p in data_cfg.valid_prefixes or []]
    problems = []
    for what, prefix in prefixes:
        problem = vocabulary_mismatch(prefix, what, read_meta(prefix), data_cfg.tokenizer, vocab)
        if problem:
            problems.append(problem)
    return problems
